"""Calibration of an evaluation (classification tasks; tasks/calibration.py): every
mode's label prior is estimated with that mode's own prefix, from the content-free
queries (`content-free`, 3 extra queries per mode) or from the dev split the adapter was
selected on (`dev-prior`, one pass over it per mode; without an adapter's record, a
random dev split drawn with the seed). The calibrated metrics come next to the plain
ones; the raw per-choice scores of every item are in the result, so any calibration
can be recomputed offline."""

from __future__ import annotations

from typing import Any

from vllm_deepthink.apps.eval.modes import EvalError


def calibration_items(task, tokenizer, method: str, adapter=None, dev_size: int = 300,
                      seed: int = 0, split: str = "train", *, evaluated: str | None = None
                      ) -> tuple[list, dict[str, Any]]:
    """The items whose scores estimate a mode's label prior, and what they were. dev-prior:
    the adapter's dev split (rebuilt from its record) or `dev_size` rows of `split`; never
    rows of `evaluated`, the split being evaluated (default the task's)."""
    from vllm_deepthink.tasks import CLASSIFICATION, calibration, dev_split, dev_split_of
    from vllm_deepthink.tasks.scoring import items_from_rows

    if task.kind != CLASSIFICATION:
        raise EvalError(f"`calibrate` {method}: task {task.name!r} is {task.kind}; "
                        f"calibration needs a fixed label set (a classification task)")
    if method == "content-free":
        items = items_from_rows(task, calibration.content_free_rows(task))
        return items, {"inputs": [i.query for i in items]}
    evaluated = evaluated or task.eval_split
    record = adapter.config.task if adapter is not None else None
    if record and "dev_size" in record:
        recorded = str(record.get("dev_split", "train"))
        if recorded == evaluated:
            raise EvalError(
                f"`calibrate` dev-prior: the adapter's dev split (which also chose its T) was "
                f"drawn from {recorded!r}, the split being evaluated; evaluate on another "
                f"split (`split`), or build the adapter with another `dev_split`")
        rows = dev_split_of(task, record)
        source = f"the adapter's dev split ({len(rows)} {recorded} rows)"
    else:
        rows = dev_split(task, dev_size, seed, exclude=set(), split=split, evaluated=evaluated)
        source = f"{len(rows)} {split} rows drawn with seed {seed}"
    return items_from_rows(task, rows), {"dev_size": len(rows), "dev_source": source}


def record_calibration(result: dict[str, Any], mode: str, scores, cal_scores,
                       labels) -> None:
    """One mode's prior (from its own calibration scores) and calibrated metrics."""
    from vllm_deepthink.tasks import calibration
    from vllm_deepthink.tasks.scoring import prediction_accuracy

    cal = result["calibration"]
    prior = calibration.log_prior(cal_scores)
    prior_norm = calibration.log_prior(cal_scores, normalize=True)
    cal["log_prior"][mode], cal["log_prior_norm"][mode] = prior, prior_norm
    cal["scores"][mode] = [[s for s, _ in item] for item in cal_scores]
    preds = calibration.calibrated_predictions(scores, prior)
    preds_norm = calibration.calibrated_predictions(scores, prior_norm, normalize=True)
    result["predictions_calibrated"][mode] = preds
    result["metrics"][mode]["acc_calibrated"] = prediction_accuracy(preds, labels)
    result["metrics"][mode]["acc_norm_calibrated"] = prediction_accuracy(preds_norm, labels)
