"""One row of the compression table: the source adapter rebuilt from the accuracy table's
row (its demonstrations and its dev-selected recipe), then every column compressed with
`producers.compress.compress_adapter` and scored on the same test items.

The accuracy table's row JSON (results/json/KEY.json) gives the demonstrations, the
recipe (dt-search's selected candidate and iteration, else dt's), the test items (all of
them, or a random `limit`: scored_indices) and the zero-shot, ICL and calibrated-ICL
predictions, which are reused rather than recomputed. The source is rebuilt
deterministically (the recipe run that far, no dev search) and checked twice: its dev accuracy against the recorded one, and its test
predictions against the row's. The row JSON under OUT/json is rewritten after every
column: it is the checkpoint (a finished column is never recomputed).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.compression.specs import (COLUMNS, ENSEMBLE_SEEDS, ROW_SCHEMA, Column,
                                                   TableOptions)
from vllm_deepthink.apps.errors import UsageError
from vllm_deepthink.apps.results.specs import RowSpec


class Deadline(Exception):
    """The time budget ran out; the row JSON holds every finished column."""


def results_row(results_dir: Path, spec: RowSpec) -> dict[str, Any]:
    path = Path(results_dir) / "json" / f"{spec.key}.json"
    if not path.is_file():
        raise UsageError(f"no accuracy-table row {path}: the compression table reuses its "
                         f"demonstrations and recipe (run `vllm-deepthink results --rows "
                         f"{spec.key}` first, or choose rows that have one)")
    return json.loads(path.read_text(encoding="utf-8"))


def source_name(row: dict[str, Any]) -> str:
    """The accuracy table's column the source stands for: dt-search when it ran."""
    return "dt-search" if "dt-search" in row["selection"] else "dt"


@dataclass
class RowInputs:
    task: Any
    inputs: Any  # from_task.TaskBuildInputs
    plan: Any  # scoring.ScoringPlan of the test items
    labels: list[int]
    queries: list[str]
    queries_info: dict[str, Any]
    choices: list[str] | None
    indices: list[int]  # of the accuracy table row's test items


def prepare(spec: RowSpec, ctx, options: TableOptions, row: dict[str, Any]) -> RowInputs:
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.compress.queries import task_choices, task_queries
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.tasks import scoring
    from vllm_deepthink.tasks.datasets import open_task

    settings = row["settings"]
    task = open_task(Path(options.data_dir) / spec.task)
    inputs = task_build_inputs(task, ctx.tokenizer, ctx.model.config, seed=spec.seed,
                               dev_size=settings["dev_size"])
    if list(inputs.info["demo_indices"]) != list(row["demos"]["indices"]):
        raise UsageError(f"{spec.key}: the demonstrations drawn now "
                         f"{inputs.info['demo_indices']} differ from the accuracy table's "
                         f"{row['demos']['indices']} (another data directory?)")
    test_rows = tasks.eval_rows(task, task.eval_split, settings["limit"], seed=0)
    indices = scored_indices(len(test_rows), options.limit)
    items = scoring.items_from_rows(task, [test_rows[i] for i in indices])
    labels = [i.label for i in items]
    if labels != [row["labels"][i] for i in indices]:
        raise UsageError(f"{spec.key}: the test items' labels differ from the accuracy "
                         f"table's row (another data directory?)")
    plan = scoring.make_plan(scoring.encode_items(ctx.tokenizer, items))
    queries, info = task_queries(task, options.queries, spec.seed, inputs.info["demo_indices"])
    return RowInputs(task, inputs, plan, labels, queries, info, task_choices(task), indices)


def items_rule(limit: int | None) -> str:
    """The rule of scored_indices, as the row JSON records it (a row computed under
    another rule is started again)."""
    if limit is None:
        return "every test item of the row"
    return f"a random {limit} of the row's test items (seed 0), in order"


def scored_indices(count: int, limit: int | None) -> list[int]:
    """Which of the row's `count` test items the table scores: all of them, or a random
    `limit` of them (seed 0) kept in order. Never the first `limit`: a split stored by
    label (MR's validation file is) would give a subset of one label."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(0).sample(range(count), limit))


def rebuild_source(spec: RowSpec, ctx, row: dict[str, Any], inputs: RowInputs):
    """(the source adapter with its label_calibration, its dev check)."""
    import torch

    from vllm_deepthink.producers.deepthink import builder, candidates, dev_scoring, search

    selection = row["selection"][source_name(row)]
    grid = search.search_grid(search.position_modes(ctx.model.config))
    candidate = next((c for c in grid if c.name == selection["selected"]), None)
    if candidate is None:
        raise UsageError(f"{spec.key}: the recorded recipe {selection['selected']!r} is not "
                         f"in this version's search grid")
    build = inputs.inputs
    with torch.inference_mode():
        adapter = builder.build_adapter(
            ctx.model, ctx.tokenizer, build.demos_text, candidates=[candidate],
            iterations=selection["selected_iteration"], label_words=build.label_words,
            task=build.info, progress=False)
        dev = dev_scoring.DevSet.from_items(ctx.tokenizer, build.dev_items,
                                            build.content_free_items, 16)
        result = dev_scoring.score_dev(ctx.model, dev, adapter.keys, adapter.values)
    adapter.keys = [k.clone() for k in adapter.keys]  # plain tensors: distillation reads them
    adapter.values = [v.clone() for v in adapter.values]
    adapter.config.label_calibration = dev_scoring.label_calibration(dev, result,
                                                                     build.label_words)
    check = {"recipe": selection["selected"], "iteration": selection["selected_iteration"],
             "dev_acc": result.acc, "dev_acc_recorded": candidates.selected_dev_acc(selection)}
    return adapter, check


def score(ctx, plan, keys, values, batch_size: int):
    import torch

    from vllm_deepthink.tasks import scoring

    with torch.inference_mode():
        return scoring.score_plan(ctx.model, plan, past_key_values=list(zip(keys, values)),
                                  batch_size=batch_size)


def scored_column(scores, labels, label_calibration) -> dict[str, Any]:
    """acc and predictions, plain and with the adapter's own dev-prior calibration."""
    from vllm_deepthink.tasks import calibration, scoring

    preds = scoring.predictions(scores)
    out = {"acc": scoring.prediction_accuracy(preds, labels), "predictions": preds}
    prior = ((label_calibration or {}).get("dev-prior") or {}).get("log_prior")
    if prior:
        cal = calibration.calibrated_predictions(scores, prior)
        out.update({"acc_dev": scoring.prediction_accuracy(cal, labels),
                    "predictions_dev": cal})
    return out


def compress_column(column: Column, source, ctx, inputs: RowInputs, options: TableOptions,
                    shared: dict[str, Any]):
    """The compressed adapter of `column` (None when k >= L); `shared`: what the row's
    columns share (the ensemble teacher, the selection's attention scores)."""
    from vllm_deepthink.producers.compress import DistillSettings, compress_adapter, teachers

    k = column.prefix_len(source.prefix_len)
    if k >= source.prefix_len:
        return None
    distill = (None if column.teacher is None else
               DistillSettings(steps=options.steps, lr=options.lr,
                               batch_size=options.batch_size))
    teacher: Any = column.teacher or "source"
    if column.teacher in ("ensemble", "ensemble-calibrated"):
        if "teacher" not in shared:
            shared["teacher"] = teachers.ensemble_teacher(ctx.model, ctx.tokenizer,
                                                            inputs.task, source,
                                                            ENSEMBLE_SEEDS)
        teacher = shared["teacher"]
        if column.teacher == "ensemble-calibrated":
            teacher = teachers.calibrated_draws(teacher)
    return compress_adapter(source, ctx.model, ctx.tokenizer, inputs.queries, prefix_len=k,
                            distill=distill, teacher=teacher, calibration_prior="dev-prior",
                            choices=inputs.choices, batch_size=options.batch_size,
                            queries_info=inputs.queries_info, progress=options.progress,
                            attention_cache=shared.setdefault("attention", {}))


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """The compression record without its per-step trace and kept positions (the table
    keeps the dev evaluations only)."""
    out = {k: v for k, v in record.items() if k not in ("selection", "distill")}
    out["selection"] = {k: v for k, v in record["selection"].items() if k != "positions"}
    if record.get("distill"):
        d = dict(record["distill"])
        d["trace"] = [e for e in d["trace"] if "dev_kl" in e]
        d["teacher"] = {k: v for k, v in d["teacher"].items() if k != "log_prior"}
        out["distill"] = d
    return out


def new_row(spec: RowSpec, row: dict[str, Any], inputs: RowInputs, options: TableOptions,
            check: dict[str, Any], source_len: int) -> dict[str, Any]:
    base = source_name(row)
    reused = {"zero-shot": "zero-shot", "icl": "icl", "icl+dev": "icl+dev",
              "source(table)": base, "source(table)+dev": f"{base}+dev"}
    columns = {name: {"acc": None, "from": f"accuracy table column {src}",
                      "predictions": [row["columns"][src]["predictions"][i]
                                      for i in inputs.indices]}
               for name, src in reused.items() if src in row["columns"]}
    from vllm_deepthink.tasks import scoring

    for c in columns.values():
        c["acc"] = scoring.prediction_accuracy(c["predictions"], inputs.labels)
    return {"schema": ROW_SCHEMA, "row": {"model": spec.model, "task": spec.task,
                                          "seed": spec.seed, "key": spec.key},
            "settings": {"limit": options.limit, "n_test": len(inputs.labels),
                         "items": items_rule(options.limit),
                         "queries": len(inputs.queries),
                         "steps": options.steps, "lr": options.lr,
                         "batch_size": options.batch_size, "source_len": source_len,
                         "source": {"column": base, **check},
                         "split": row["settings"]["split"]},
            "labels": inputs.labels, "columns": columns, "seconds": {}}


def compute_row(spec: RowSpec, ctx, options: TableOptions, out: Path,
                deadline: float | None = None, write=None) -> dict[str, Any]:
    """Every column of `options.columns` not yet in OUT/json/KEY.json, the JSON rewritten
    (by `write(path, data)`) after each; raises Deadline after a column when past
    `deadline` (time.time())."""
    from vllm_deepthink.apps.compression import paired
    from vllm_deepthink.apps.results.checkpoints import write_json_atomic
    from vllm_deepthink.producers.compress import CompressError

    write = write or write_json_atomic
    path = Path(out) / "json" / f"{spec.key}.json"
    table_row = results_row(options.results_dir, spec)
    inputs = prepare(spec, ctx, options, table_row)
    t = time.perf_counter()
    source, check = rebuild_source(spec, ctx, table_row, inputs)
    build_seconds = time.perf_counter() - t
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if data is None or data["settings"].get("items") != items_rule(options.limit):
        data = new_row(spec, table_row, inputs, options, check, source.prefix_len)
    if "source" not in data["columns"]:
        t = time.perf_counter()
        column = scored_column(score(ctx, inputs.plan, source.keys, source.values,
                                     options.batch_size), inputs.labels,
                               source.config.label_calibration)
        table_preds = data["columns"].get("source(table)", {}).get("predictions")
        column.update(k=source.prefix_len, seconds={"build": round(build_seconds, 1),
                                                   "score": round(time.perf_counter() - t, 1)},
                      differs_from_table=(None if table_preds is None else
                                          sum(a != b for a, b in zip(column["predictions"],
                                                                     table_preds))))
        data["columns"]["source"] = column
        paired.update(data)
        write(path, data)
    shared: dict[str, Any] = {}
    for column in COLUMNS:
        if column.name not in options.columns or column.name in data["columns"]:
            continue
        if deadline is not None and time.time() > deadline:
            raise Deadline("time budget reached")
        t = time.perf_counter()
        try:
            adapter = compress_column(column, source, ctx, inputs, options, shared)
        except CompressError as exc:  # this row cannot have this column (e.g. its labels)
            data["columns"][column.name] = {"skipped": str(exc)}
            write(path, data)
            continue
        if adapter is None:
            data["columns"][column.name] = {"skipped": f"k >= L = {source.prefix_len}"}
            write(path, data)
            continue
        built = time.perf_counter() - t
        t = time.perf_counter()
        entry = scored_column(score(ctx, inputs.plan, adapter.keys, adapter.values,
                                    options.batch_size), inputs.labels,
                              adapter.config.label_calibration)
        entry.update(k=adapter.prefix_len, teacher=column.teacher,
                     seconds={"build": round(built, 1),
                              "score": round(time.perf_counter() - t, 1)},
                     record=_summary(adapter.config.compression))
        data["columns"][column.name] = entry
        paired.update(data)
        write(path, data)
    return data
