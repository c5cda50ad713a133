"""Accuracy of zero-shot, ICL and Deep-Thinking on a task: the library of `vllm-deepthink
eval` (apps/eval.py is its command line).

Modes (every mode scores the same items, choice by choice, see tasks/scoring.py):
  zero-shot  the query alone, after the tokenizer's special prefix (BOS if it adds one,
             i.e. the ids of an empty demonstration string);
  icl        the adapter's own demonstration ids (config.demo_token_ids) before the query;
  deepthink  the adapter's K/V as a prefix (positions 0..L-1), the query from position L.

Engines (`make_scorer`): `vllm` (one engine for all modes; Deep-Thinking through the
vllm_deepthink plugin, plugin/scoring.py) or `hf` (transformers, tasks.scoring.HFScorer).
Both run the same scoring plan.

Calibration (classification tasks; tasks/calibration.py): every mode's label prior is
estimated with that mode's own prefix, from the content-free queries (`content-free`, 3
extra queries per mode) or from the dev split the adapter was selected on (`dev-prior`,
one pass over it per mode; without an adapter's record, a random dev split of train rows
drawn with the seed). The calibrated metrics come next to the plain ones; the raw
per-choice scores of every item are in the result, so any calibration can be recomputed
offline.

`evaluate` returns the result part of the JSON of `eval --output-json` (schema_version 2,
described in apps/eval.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

MODES = ("zero-shot", "icl", "deepthink")
SCHEMA_VERSION = 2
ADAPTER_NAME = "eval"


class EvalError(ValueError):
    """A request the evaluation cannot serve (e.g. calibrating a multiple-choice task)."""


def mode_prefix(mode: str, tokenizer, adapter) -> dict[str, Any]:
    """Keyword arguments of Scorer.score for a mode, and the prefix length."""
    if mode == "zero-shot":
        ids = list(tokenizer("")["input_ids"])
        return {"prefix_ids": ids, "prefix_len": len(ids)}
    if mode == "icl":
        return {"prefix_ids": list(adapter.config.demo_token_ids),
                "prefix_len": adapter.config.prefix_len}
    return {"adapter": ADAPTER_NAME, "prefix_len": adapter.config.prefix_len}


def calibration_items(task, tokenizer, method: str, adapter=None, dev_size: int = 300,
                      seed: int = 0, split: str = "train", *, evaluated: str | None = None
                      ) -> tuple[list, dict[str, Any]]:
    """The items whose scores estimate a mode's label prior, and what they were. dev-prior:
    the adapter's dev split (rebuilt from its record) or `dev_size` rows of `split`; never
    rows of `evaluated`, the split being evaluated (default the task's)."""
    from vllm_deepthink.tasks import CLASSIFICATION, calibration, dev_split, dev_split_of
    from vllm_deepthink.tasks.scoring import items_from_rows

    if task.kind != CLASSIFICATION:
        raise EvalError(f"--calibrate {method}: task {task.name!r} is {task.kind}; calibration "
                        f"needs a fixed label set (a classification task)")
    if method == "content-free":
        items = items_from_rows(task, calibration.content_free_rows(task))
        return items, {"inputs": [i.query for i in items]}
    evaluated = evaluated or task.eval_split
    record = adapter.config.task if adapter is not None else None
    if record and "dev_size" in record:
        recorded = str(record.get("dev_split", "train"))
        if recorded == evaluated:
            raise EvalError(
                f"--calibrate dev-prior: the adapter's dev split (which also chose its T) was "
                f"drawn from {recorded!r}, the split being evaluated; evaluate on another "
                f"split (--split), or build the adapter with another --dev-split")
        rows = dev_split_of(task, record)
        source = f"the adapter's dev split ({len(rows)} {recorded} rows)"
    else:
        rows = dev_split(task, dev_size, seed, exclude=set(), split=split, evaluated=evaluated)
        source = f"{len(rows)} {split} rows drawn with seed {seed}"
    return items_from_rows(task, rows), {"dev_size": len(rows), "dev_source": source}


def _accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def _record_scores(result: dict[str, Any], mode: str, scores, labels) -> None:
    from vllm_deepthink.tasks.scoring import accuracy, predictions

    result["metrics"][mode] = accuracy(scores, labels)
    result["predictions"][mode] = predictions(scores)
    result["predictions_norm"][mode] = predictions(scores, normalize=True)
    result["scores"][mode] = [[s for s, _ in item] for item in scores]


def _record_calibration(result: dict[str, Any], mode: str, scores, cal_scores,
                        labels) -> None:
    """One mode's prior (from its own calibration scores) and calibrated metrics."""
    from vllm_deepthink.tasks import calibration

    cal = result["calibration"]
    prior = calibration.log_prior(cal_scores)
    prior_norm = calibration.log_prior(cal_scores, normalize=True)
    cal["log_prior"][mode], cal["log_prior_norm"][mode] = prior, prior_norm
    cal["scores"][mode] = [[s for s, _ in item] for item in cal_scores]
    preds = calibration.calibrated_predictions(scores, prior)
    preds_norm = calibration.calibrated_predictions(scores, prior_norm, normalize=True)
    result["predictions_calibrated"][mode] = preds
    result["metrics"][mode]["acc_calibrated"] = _accuracy(preds, labels)
    result["metrics"][mode]["acc_norm_calibrated"] = _accuracy(preds_norm, labels)


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
        _record_scores(result, mode, scores, labels)
        if cal_plan is not None:
            _record_calibration(result, mode, scores, scorer.score(cal_plan, **kwargs), labels)
    return result


def max_prompt_len(tokenizer, task, rows, adapter, modes, extra_items=()) -> int:
    """Tokens of the longest prompt any mode sends (prefix + query + choice)."""
    from vllm_deepthink.tasks.scoring import encode_items, items_from_rows

    encoded = encode_items(tokenizer, items_from_rows(task, rows) + list(extra_items))
    longest = max(len(e.query_ids) + max(len(c) for c in e.choice_ids) for e in encoded)
    prefix = max(mode_prefix(m, tokenizer, adapter)["prefix_len"] for m in modes)
    return prefix + longest


def engine_max_len(needed: int) -> int:
    # One generated token on top; a multiple of the CPU block size (128).
    return max(256, -(-(needed + 1) // 128) * 128)


def format_table(title: str, result: dict[str, Any]) -> str:
    calibrated = result.get("calibration") is not None
    head = f"{'mode':<10} {'acc':>7} {'acc_norm':>9}"
    if calibrated:
        head += f" {'acc_cal':>8}"
    lines = [title, head + f" {'n':>6} {'prefix':>7} {'sec':>7}"]
    for mode, m in result["metrics"].items():
        line = f"{mode:<10} {m['acc']:>7.4f} {m['acc_norm']:>9.4f}"
        if calibrated:
            line += f" {m['acc_calibrated']:>8.4f}"
        lines.append(line + f" {m['n']:>6} {result['prefix_tokens'][mode]:>7} "
                            f"{result['seconds'][mode]:>7.1f}")
    if calibrated:
        lines.append(f"acc_cal: calibrated with {result['calibration']['method']}")
    return "\n".join(lines)


def adapter_summary(adapter) -> dict[str, Any] | None:
    if adapter is None:
        return None
    c = adapter.config
    return {"prefix_len": c.prefix_len, "selected_iteration": c.selected_iteration,
            "iterations_run": c.iterations_run, "optimizer": c.optimizer,
            "optimizer_params": c.optimizer_params, "position_mode": c.position_mode,
            "demos_text": c.demos_text}


def load_adapter_for(model_dir: str | Path, adapter_dir: str | Path):
    """The adapter, checked against the model's fingerprint."""
    from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint

    return DeepThinkAdapter.from_pretrained(
        adapter_dir, expected_fingerprint=ModelFingerprint.from_checkpoint(model_dir))


def make_scorer(engine: str, model_dir: str | Path, adapters: dict[str, Any],
                adapter_dirs: dict[str, str | Path], max_len: int, batch_size: int = 16,
                progress: bool = True, **engine_kwargs: Any):
    """An HFScorer or VllmScorer; `adapters` (name -> loaded adapter) for hf,
    `adapter_dirs` (name -> directory) for vllm."""
    if engine == "hf":
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_deepthink.tasks.scoring import HFScorer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        return HFScorer(model, adapters, batch_size=batch_size, progress=progress)
    from vllm_deepthink.plugin.scoring import VllmScorer, make_engine

    llm = make_engine(model_dir, adapters=adapter_dirs or None,
                      max_model_len=engine_max_len(max_len), **engine_kwargs)
    return VllmScorer(llm, progress=progress)
