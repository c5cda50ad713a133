"""What the compression table is made of: its rows (the results table's RowSpec: model,
task, demo seed, in priority order), its columns (`Column`: k and how the k positions
are made) and how they are computed (`TableOptions`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_deepthink.apps.results.specs import RowSpec

ROW_SCHEMA = "vllm-deepthink/compression-row/1"
SMOLLM2_TASKS = ("sst2", "sst5", "mr", "trec", "agnews")
GEMMA_TASKS = ("sst2", "mr")
DEFAULT_LIMIT = None  # every test item of the row
ENSEMBLE_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Column:
    """One compressed adapter of a row. k: "L/R" (round(L / R)) or an integer string;
    teacher: None (selection only), "source", "calibrated" (dev-prior), "ensemble"
    (the source's recipe over ENSEMBLE_SEEDS) or "ensemble-calibrated" (the same draws,
    each with its own label prior over the train queries divided out)."""

    name: str
    k: str
    teacher: str | None = None

    def prefix_len(self, source_len: int) -> int:
        if self.k.startswith("L/"):
            return max(2, int(round(source_len / float(self.k[2:]))))
        return int(self.k)


# Cheapest and most telling first, so an interrupted row has its selection columns.
COLUMNS = (
    Column("sel-L/2", "L/2"), Column("sel-L/4", "L/4"), Column("sel-L/8", "L/8"),
    Column("sel-16", "16"),
    Column("dist-L/8", "L/8", "source"), Column("dist-16", "16", "source"),
    Column("dist-L/8-cal", "L/8", "calibrated"), Column("dist-L/8-ens", "L/8", "ensemble"),
    Column("dist-L/8-ens-cal", "L/8", "ensemble-calibrated"),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)


def default_rows() -> list[RowSpec]:
    """SmolLM2 over 3 seeds (seed-major: every task early), then Gemma 3 270M seed 0."""
    rows = [RowSpec("smollm2", t, s) for s in (0, 1, 2) for t in SMOLLM2_TASKS]
    return rows + [RowSpec("gemma3-270m", t, 0) for t in GEMMA_TASKS]


def select_rows(patterns: str | None) -> list[RowSpec]:
    """The default rows matching comma-separated row keys or fnmatch patterns."""
    import fnmatch

    rows = default_rows()
    if not patterns:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in rows if any(fnmatch.fnmatch(r.key, p) for p in wanted)]
    if not chosen:
        raise ValueError(f"`rows` {patterns!r} matches none of the compression rows "
                         f"({', '.join(r.key for r in rows[:3])}, ...)")
    return chosen


@dataclass(frozen=True)
class TableOptions:
    """How rows are computed (cli.py fills it from its flags).

    results_dir: the accuracy table whose row JSONs give the demonstrations, the source's
    recipe, the test items and the zero-shot / ICL / calibrated-ICL columns; limit: a
    random `limit` of that row's test items (None: all of them); queries: train rows
    drawn as the compressor's queries; steps: distillation steps (early stopping on the
    dev KL)."""

    data_dir: Path
    results_dir: Path = Path("results")
    columns: tuple[str, ...] = COLUMN_NAMES
    limit: int | None = DEFAULT_LIMIT
    queries: int = 256
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 16
    progress: bool = True
