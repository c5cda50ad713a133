"""Rows of the compression table computed in order, one model in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_deepthink.apps.compression.specs import TableOptions
from vllm_deepthink.apps.results.specs import RowSpec


def _done(out: Path, spec: RowSpec) -> set[str]:
    path = out / "json" / f"{spec.key}.json"
    if not path.is_file():
        return set()
    return set(json.loads(path.read_text(encoding="utf-8"))["columns"])


def row_states(out: Path, specs: list[RowSpec], columns: tuple[str, ...]):
    """(key, "done" / "k of n columns" / "to do") per row."""
    for spec in specs:
        done = _done(Path(out), spec) & set(columns)
        state = ("done" if len(done) == len(columns) else
                 f"{len(done)} of {len(columns)} columns" if done else "to do")
        yield spec.key, state


def update_table(out: Path, specs: list[RowSpec], options: TableOptions,
                 models_dir: str | Path = "models", deadline: float | None = None
                 ) -> tuple[int, str | None]:
    """Compute every unfinished row of `specs`; (rows finished, why it stopped or None)."""
    from tqdm.auto import tqdm

    from vllm_deepthink.apps.compression.run import Deadline, compute_row
    from vllm_deepthink.apps.results.runs import ModelContext
    from vllm_deepthink.apps.results.table import model_dir

    out = Path(out)
    todo = [s for s in specs if not set(options.columns) <= _done(out, s) | {"source"}]
    contexts: dict[str, ModelContext] = {}
    finished = 0
    bar = tqdm(todo, desc="compression rows", unit="row", disable=not options.progress)
    for spec in bar:
        bar.set_postfix_str(spec.key)
        if spec.model not in contexts:
            contexts.clear()
            contexts[spec.model] = ModelContext(spec.model, model_dir(spec.model, models_dir))
        try:
            compute_row(spec, contexts[spec.model], options, out, deadline)
        except Deadline as exc:
            return finished, str(exc)
        finished += 1
    return finished, None
