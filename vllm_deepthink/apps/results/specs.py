"""What the results table is made of: its rows (`RowSpec`: model, task, demo seed, in
priority order), how they are computed (`RowOptions`), and the row JSON's schema."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

ROW_SCHEMA = "vllm-deepthink/results-row/1"
CLASSIFICATION_TASKS = ("sst2", "mr", "trec", "sst5", "agnews")
MC_TASKS = ("copa", "openbookqa", "qasc", "winogrande", "hellaswag")
MODEL_DIRS = {"smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
GEMMA_TASKS = ("sst2", "mr", "trec", "sst5")
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class RowSpec:
    model: str
    task: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}-{self.task}-s{self.seed}"


def default_rows() -> list[RowSpec]:
    """Most important first: SmolLM2 classification over 3 seeds (seed-major, so the
    mean over tasks has every task early; the long AG News last in each seed), then
    Gemma 3 270M, then SmolLM2 on the multiple-choice tasks (1 seed)."""
    rows = [RowSpec("smollm2", t, s) for s in (0, 1, 2) for t in CLASSIFICATION_TASKS]
    rows += [RowSpec("gemma3-270m", t, s) for s in (0, 1, 2) for t in GEMMA_TASKS]
    rows += [RowSpec("smollm2", t, 0) for t in MC_TASKS]
    return rows


@dataclass(frozen=True)
class RowOptions:
    """How rows are computed (apps/results/cli.py fills it from its flags)."""

    data_dir: Path  # holds the built-in task directories
    adapters_dir: Path  # where the dt and dt-search adapters of each row go
    policy: SelectionPolicy  # the selection protocol of every candidate
    limit: int = DEFAULT_LIMIT  # test items per row
    dev_size: int = 300
    batch_size: int = 16  # scoring batch size
    skip_search: bool = False  # every column but dt-search (its grid: the published default)
    progress: bool = True


def select_rows(patterns: str | None) -> list[RowSpec]:
    """The default rows matching comma-separated `patterns` (row keys or fnmatch patterns,
    MODEL-TASK-sSEED), then exact keys outside the default table; all rows for None."""
    rows = default_rows()
    if not patterns:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in rows if any(fnmatch.fnmatch(r.key, p) for p in wanted)]
    known = {r.key for r in rows}
    extra = []
    for p in wanted:  # an exact key outside the default table: MODEL-TASK-sSEED
        if any(c in p for c in "*?[") or p in known:
            continue
        name, _, seed = p.rpartition("-s")
        model = next((m for m in MODEL_DIRS if name.startswith(m + "-")), None)
        if model is None or not seed.isdigit():
            raise ValueError(f"`rows`: {p!r} is neither a pattern of the default rows nor "
                             f"MODEL-TASK-sSEED with MODEL in {sorted(MODEL_DIRS)}")
        extra.append(RowSpec(model, name[len(model) + 1:], int(seed)))
    if not chosen and not extra:
        raise ValueError(f"`rows` {patterns!r} matches none of the default rows "
                         f"({', '.join(r.key for r in rows[:3])}, ...)")
    return chosen + extra
