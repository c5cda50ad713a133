"""The results table, resumable: `update_table` computes the rows still to do (one
model in memory at a time; a row whose JSON exists is never recomputed), stops cleanly
after `max_rows` new rows or at the first checkpoint past the time budget, and
regenerates OUT/results.md and OUT/curves.png from every row JSON. It is what
`vllm-deepthink results` runs; run it again to continue."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_deepthink.apps.results import report
from vllm_deepthink.apps.results.checkpoints import (
    row_path,
    row_state,
    work_dir,
    write_json_atomic,
)
from vllm_deepthink.apps.results.row import compute_row
from vllm_deepthink.apps.results.runs import Deadline, ModelContext
from vllm_deepthink.apps.results.specs import (
    MODEL_DIRS,
    ROW_SCHEMA,
    RowOptions,
    RowSpec,
    default_rows,
)

FINISHED = ("done", "done without search")


def _now() -> float:
    """Wall-clock time of the time budget (one place, so tests can move it)."""
    return time.time()


def parse_duration(text: str | None) -> float | None:
    """'7200', '90m', '2h', '1h30m' -> seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?",
                         text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"`time_budget` {text!r}: expected seconds or a duration like 2h, "
                         f"90m, 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


def model_dir(name: str, models_dir: str | Path = "models",
              model_paths: dict[str, str | Path] | None = None) -> Path:
    """The HF directory of row model `name`: `model_paths[name]` when given, else
    MODELS_DIR/MODEL_DIRS[name], converted from its packaged GGUF when missing."""
    if model_paths and name in model_paths:
        return Path(model_paths[name])
    directory = Path(models_dir) / MODEL_DIRS[name]
    from vllm_deepthink.tools.gguf_models import convert_model, is_complete

    if not is_complete(directory):
        convert_model(name, directory)
    return directory


def _row_line(key: str, row: dict) -> str:
    c = row["columns"]
    return (f"[results] {key}: zero-shot {c['zero-shot']['acc']:.3f} icl "
            f"{c['icl']['acc']:.3f} dt {c['dt']['acc']:.3f} (T="
            f"{row['selection']['dt']['selected_iteration']})"
            + (f" dt-search {c['dt-search']['acc']:.3f}" if "dt-search" in c else "")
            + f" ({row['seconds']['row (this invocation)']:.0f} s)")


def compute_rows(out: Path, todo: list[RowSpec], options: RowOptions,
                 model_dir_of: Callable[[str], Path], max_rows: int | None = None,
                 deadline: float | None = None) -> tuple[int, str | None]:
    """Compute the rows of `todo` in order, one model in memory at a time; stop after
    `max_rows` rows or at the deadline. Returns (rows computed, why it stopped or None)."""
    from tqdm.auto import tqdm

    contexts: dict[str, ModelContext] = {}
    computed, stopped = 0, None
    bar = tqdm(todo, desc="results rows", unit="row", disable=not options.progress)
    for spec in bar:
        if max_rows is not None and computed >= max_rows:
            stopped = f"max_rows ({max_rows}) reached"
            break
        if deadline is not None and _now() > deadline:
            stopped = "time budget reached"
            break
        bar.set_postfix_str(spec.key)
        if spec.model not in contexts:
            contexts.clear()  # one model in memory at a time
            contexts[spec.model] = ModelContext(spec.model, model_dir_of(spec.model))
        try:
            row = compute_row(spec, contexts[spec.model], options, out, deadline, now=_now)
        except Deadline as exc:
            stopped = str(exc)
            break
        write_json_atomic(row_path(out, spec), row)
        if not options.skip_search:  # a skip-search row keeps its checkpoints for the search
            shutil.rmtree(work_dir(out, spec), ignore_errors=True)
        computed += 1
        tqdm.write(_row_line(spec.key, row))
    bar.close()
    return computed, stopped


def write_report(out: str | Path) -> str:
    """OUT/results.md and OUT/curves.png from every row JSON; returns the markdown."""
    return report.write_report(out, ROW_SCHEMA, [s.key for s in default_rows()])


@dataclass
class TableRun:
    """What one `update_table` did: rows computed, why it stopped early (None: it did
    not), the rows still to do, and the regenerated results.md."""

    computed: int
    stopped: str | None
    left: list[RowSpec]
    report: str


def update_table(out: str | Path, specs: list[RowSpec], options: RowOptions, *,
                 models_dir: str | Path = "models",
                 model_paths: dict[str, str | Path] | None = None,
                 max_rows: int | None = None, time_budget: float | None = None) -> TableRun:
    """Compute the rows of `specs` not finished under `out` (at most `max_rows`, stopping
    at the next checkpoint after `time_budget` seconds), then regenerate the report."""
    out = Path(out)
    with_search = not options.skip_search
    deadline = None if time_budget is None else _now() + time_budget
    todo = [s for s in specs if row_state(out, s, with_search) not in FINISHED]
    print(f"[results] {len(specs) - len(todo)} of {len(specs)} rows done; "
          f"{len(todo)} to compute" + (f" (at most {max_rows})" if max_rows else "")
          + (f", time budget {time_budget:.0f} s" if time_budget else ""), flush=True)
    computed, stopped = compute_rows(out, todo, options,
                                     lambda name: model_dir(name, models_dir, model_paths),
                                     max_rows, deadline)
    left = [s for s in specs if row_state(out, s, with_search) not in FINISHED]
    return TableRun(computed, stopped, left, write_report(out))
