"""One row of the results table: the columns chosen from the grid's runs (dt, dt-search
on dev; dt-oracle on the test trace), the adapters saved for serving, and the row JSON
(`compute_row`, schema specs.ROW_SCHEMA). Every row JSON keeps the per-choice scores of
every column and the priors, so each calibration can be recomputed offline, and the dev
trace of every candidate plus the test trace of the published-default run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_deepthink.apps.results.checkpoints import RowCheckpoints, row_path, work_dir
from vllm_deepthink.apps.results.columns import (
    paired_comparisons,
    rounded_scores,
    row_columns,
    row_priors,
)
from vllm_deepthink.apps.results.runs import (
    GridRuns,
    ModelContext,
    RowInputs,
    RowScorer,
    prepare_row,
    restore_first_pass,
    run_grid,
    zero_shot_scores,
)
from vllm_deepthink.apps.results.specs import ROW_SCHEMA, RowOptions, RowSpec

if TYPE_CHECKING:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy


@dataclass
class Selected:
    """The dt, dt-search and dt-oracle choices and the test scores of the columns
    icl, dt, dt-search and dt-oracle."""

    default: Any  # candidates.Selection
    searched: Any  # candidates.Selection
    oracle_iteration: int
    tests: dict[str, Any]


def select_columns(grid: GridRuns, policy: SelectionPolicy, scorer: RowScorer,
                   seconds: dict[str, float]) -> Selected:
    """dt (the published default's run), dt-search (the whole grid), both selected on
    dev, and dt-oracle (T picked on the test trace), with their test scores."""
    import torch

    from vllm_deepthink.producers.deepthink import candidates

    runs, trace, trace_scores = grid.runs, grid.test_trace, grid.test_trace_scores
    default = candidates.choose(runs[:1], grid.icl, policy)
    searched = candidates.choose(runs, grid.icl, policy)
    icl_test = scorer.with_lengths(trace_scores[0])
    if searched.iteration == 1:
        search_test = icl_test
    elif searched.run is runs[0]:
        search_test = scorer.with_lengths(trace_scores[searched.iteration - 1])
    else:
        t = time.perf_counter()
        with torch.inference_mode():
            search_test = scorer.score(searched.keys, searched.values)
        seconds["dt-search test"] = time.perf_counter() - t
    oracle = max(range(len(trace)), key=lambda i: (trace[i]["test_acc"], -i)) + 1
    tests = {"icl": icl_test, "dt": scorer.with_lengths(trace_scores[default.iteration - 1]),
             "dt-search": search_test,
             "dt-oracle": scorer.with_lengths(trace_scores[oracle - 1])}
    return Selected(default, searched, oracle, tests)


def save_adapters(spec: RowSpec, ctx: ModelContext, row: RowInputs, options: RowOptions,
                  selected: Selected) -> dict[str, str]:
    """The adapters of dt and dt-search, for serving: column -> directory."""
    from vllm_deepthink.producers.deepthink import builder

    selections = [("dt", selected.default)]
    if not options.skip_search:
        selections.append(("dt-search", selected.searched))
    saved = {}
    for name, selection in selections:
        adapter = builder.adapter_from_selection(
            ctx.model, row.build.demos_text, row.build.demo_ids, selection, dev=row.dev,
            label_words=row.build.label_words, task=row.build.info,
            build_args={"results_row": spec.key, "column": name},
            base_model_name_or_path=str(ctx.dir.resolve()))
        directory = Path(options.adapters_dir) / f"{spec.key}-{name}"
        adapter.save_pretrained(directory)
        saved[name] = str(directory)
    return saved


def row_settings(ctx: ModelContext, options: RowOptions, row: RowInputs) -> dict[str, Any]:
    import torch

    return {"model_dir": str(ctx.dir), "task": row.task.to_dict(),
            "split": row.task.eval_split, "limit": options.limit, "n_test": len(row.labels),
            "dev_size": row.dev.size, "policy": options.policy.to_dict(),
            "grid": [c.to_dict() for c in row.grid], "engine": "hf",
            "threads": torch.get_num_threads()}


def assemble_row(spec: RowSpec, ctx: ModelContext, options: RowOptions, row: RowInputs,
                 zero_shot, grid: GridRuns, selected: Selected, adapters: dict[str, str],
                 seconds: dict[str, float]) -> dict[str, Any]:
    """The row JSON (schema ROW_SCHEMA)."""
    skip = options.skip_search
    priors = {"icl": row_priors(grid.icl[0]), "dt": row_priors(selected.default.dev),
              "dt-search": row_priors(selected.searched.dev)}
    columns = row_columns(zero_shot, selected.tests, row.labels, priors, skip)
    scores = {"zero-shot": rounded_scores(zero_shot)}
    scores.update({name: rounded_scores(selected.tests[name])
                   for name in ("icl", "dt", "dt-search", "dt-oracle")
                   if not (skip and name == "dt-search")})
    selection = {"dt": selected.default.summary, "dt-search": selected.searched.summary,
                 "dt-oracle": {"iteration": selected.oracle_iteration,
                               "note": "T picked on the test split: an upper bound, "
                                       "never a claim"}}
    if skip:
        del selection["dt-search"]
    build = row.build
    return {
        "schema": ROW_SCHEMA,
        "search": "skipped" if skip else "run",
        "row": {"model": spec.model, "task": spec.task, "seed": spec.seed, "key": spec.key},
        "settings": row_settings(ctx, options, row),
        "demos": {"prefix_len": len(build.demo_ids),
                  "shots_per_class": build.info["shots_per_class"],
                  "indices": build.info["demo_indices"], "fit": build.demos.fit},
        "labels": row.labels,
        "choice_tokens": row.test_plan.choice_lengths,
        "scores": scores,
        "priors": priors,
        "columns": columns,
        "paired": paired_comparisons(columns, row.labels),
        "selection": selection,
        "test_trace": grid.test_trace,
        "test_trace_scores": grid.test_trace_scores,
        "adapters": adapters,
        "seconds": seconds,
    }


def compute_row(spec: RowSpec, ctx: ModelContext, options: RowOptions, out: Path,
                deadline: float | None = None, now: Callable[[], float] = time.time
                ) -> dict[str, Any]:
    """Compute (or resume from OUT/work/ROW/) one row; raises Deadline between candidates
    or iterations once `now()` is past `deadline`."""
    started = time.perf_counter()
    checkpoints = RowCheckpoints(work_dir(out, spec))
    row = prepare_row(spec, ctx, options)
    scorer = RowScorer(ctx.model, row.test_plan, options.batch_size)
    first_pass = row_path(out, spec)
    if (not options.skip_search and first_pass.is_file()
            and checkpoints.load_candidate(0, row.grid[0]) is None):
        data = json.loads(first_pass.read_text())
        if data.get("search") == "skipped":
            restore_first_pass(checkpoints, data, ctx.model, row, scorer)
    seconds: dict[str, float] = {}
    zero_shot = zero_shot_scores(checkpoints, scorer, ctx.tokenizer, seconds)
    grid = run_grid(spec, ctx.model, row, options, checkpoints, scorer, deadline, now)
    selected = select_columns(grid, options.policy, scorer, seconds)
    adapters = save_adapters(spec, ctx, row, options, selected)
    seconds["search candidates"] = sum(r.seconds for r in grid.runs)
    seconds["published candidate"] = grid.runs[0].seconds
    seconds["test trace"] = sum(e["test_seconds"] for e in grid.test_trace)
    seconds["row (this invocation)"] = time.perf_counter() - started
    return assemble_row(spec, ctx, options, row, zero_shot, grid, selected, adapters, seconds)
