"""`evaluate`: the items of a task scored in each mode (modes.py) by one scorer, with
their metrics, predictions and per-choice scores: the result part of the JSON of
`eval --output-json` (report.py documents it)."""

from __future__ import annotations

import time
from typing import Any

from vllm_deepthink.apps.eval.calibrate import record_calibration
from vllm_deepthink.apps.eval.modes import ADAPTER_NAME, mode_prefix


def record_scores(result: dict[str, Any], mode: str, scores, labels) -> None:
    from vllm_deepthink.tasks.scoring import accuracy, predictions

    result["metrics"][mode] = accuracy(scores, labels)
    result["predictions"][mode] = predictions(scores)
    result["predictions_norm"][mode] = predictions(scores, normalize=True)
    result["scores"][mode] = [[s for s, _ in item] for item in scores]


def evaluate(scorer, tokenizer, task, rows: list[dict], modes: list[str], adapter=None,
             adapter_name: str = ADAPTER_NAME, progress: bool = True,
             calibrate: str = "none", calibration_rows: tuple[list, dict] | None = None
             ) -> dict[str, Any]:
    """Score `rows` in each mode; the metrics/predictions/scores part of the JSON schema.
    With `calibrate`, `calibration_rows` = calibration_items(...)."""
    from vllm_deepthink.tasks.scoring import encode_items, items_from_rows, make_plan

    items = items_from_rows(task, rows)
    plan = make_plan(encode_items(tokenizer, items))
    labels = [item.label for item in items]
    result: dict[str, Any] = {"prefix_tokens": {}, "metrics": {}, "predictions": {},
                              "predictions_norm": {}, "labels": labels,
                              "choice_tokens": plan.choice_lengths, "scores": {},
                              "seconds": {}, "calibration": None}
    cal_plan = None
    if calibrate != "none":
        cal_items, source = calibration_rows
        cal_plan = make_plan(encode_items(tokenizer, cal_items))
        result["calibration"] = {"method": calibrate, **source, "log_prior": {},
                                 "log_prior_norm": {}, "scores": {}}
        result["predictions_calibrated"] = {}
    for mode in modes:
        kwargs = mode_prefix(mode, tokenizer, adapter)
        result["prefix_tokens"][mode] = kwargs.pop("prefix_len")
        if "adapter" in kwargs:
            kwargs["adapter"] = adapter_name
        start = time.perf_counter()
        if progress:
            print(f"[eval] {task.name}: {mode} on {len(items)} items ({scorer.engine})",
                  flush=True)
        scores = scorer.score(plan, **kwargs)
        result["seconds"][mode] = time.perf_counter() - start
        record_scores(result, mode, scores, labels)
        if cal_plan is not None:
            record_calibration(result, mode, scores, scorer.score(cal_plan, **kwargs), labels)
    return result
