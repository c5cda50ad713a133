"""`vllm-deepthink eval`: accuracy of zero-shot, ICL and Deep-Thinking on a task.

Modes (every mode scores the same items, choice by choice, see scoring.py):
  zero-shot  the query alone, after the tokenizer's special prefix (BOS if it adds one,
             i.e. the ids of an empty demonstration string);
  icl        the adapter's own demonstration ids (config.demo_token_ids) before the query;
  deepthink  the adapter's K/V as a prefix (positions 0..L-1), the query from position L.

Engines: `vllm` (one engine for all modes; Deep-Thinking through the vllm_deepthink
plugin) or `hf` (transformers, scoring.score_plan). Both run the same scoring plan.

Calibration (`--calibrate`, classification tasks; tasks/calibration.py): every mode's
label prior is estimated with that mode's own prefix, from the content-free queries
(`content-free`, 3 extra queries per mode) or from the dev split the adapter was
selected on (`dev-prior`, one pass over it per mode; without an adapter's record, a
random --dev-size train split drawn with --seed). The calibrated metrics come next to
the plain ones; the raw per-choice scores of every item are in the JSON, so any
calibration can be recomputed offline.

JSON written by --output-json (schema_version 2):
  settings:         model, task_dir, dataset, task (tasks.Task.to_dict()), split, limit, seed,
                    engine, modes, adapter (path or null), adapter_config (prefix_len,
                    selected_iteration, iterations_run, optimizer, optimizer_params,
                    position_mode, demos_text)
  prefix_tokens:    {mode: tokens before the query (0/1 for zero-shot, L otherwise)}
  metrics:          {mode: {"acc", "acc_norm", "n"}}; acc ranks choices by summed
                    logprob, acc_norm by mean logprob per token
  predictions:      {mode: [argmax choice index by summed logprob, per item]}
  predictions_norm: {mode: [argmax choice index by mean logprob, per item]}
  labels:           [gold choice index, per item]  (items in eval-split file order)
  choice_tokens:    [[tokens of each choice], per item]
  scores:           {mode: [[summed logprob of each choice], per item]}
  seconds:          {mode: scoring wall time}
  calibration:      null, or {"method", "log_prior": {mode: [...]},
                    "log_prior_norm": {mode: [...]} (from mean-per-token scores),
                    "inputs": [content-free queries] or "dev_size": n,
                    "scores": {mode: [[...]]} (the content-free / dev per-choice scores)};
                    metrics[mode] then holds acc_calibrated / acc_norm_calibrated and
                    predictions_calibrated {mode: [...]} the calibrated argmax
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MODES = ("zero-shot", "icl", "deepthink")
SCHEMA_VERSION = 2
ADAPTER_NAME = "eval"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = "Accuracy of zero-shot vs ICL vs Deep-Thinking on one task."
    parser.add_argument("--model", required=True,
                        help="HF model: a local directory or a hub id (ORG/NAME)")
    parser.add_argument("--task-dir", default=None,
                        help="task directory (a built-in task such as examples/data/sst2, or "
                             "one with task.json); with --dataset, the directory of its "
                             "task.json")
    parser.add_argument("--dataset", default=None,
                        help="rows from the `datasets` library: NAME[:CONFIG] of the hub or a "
                             "local json/csv/parquet file or directory")
    parser.add_argument("--adapter", default=None,
                        help="Deep-Thinking adapter directory (needed by icl and deepthink)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of zero-shot,icl,deepthink (default: all "
                             "three with --adapter, else zero-shot)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--split", default=None, choices=("test", "validation", "train"),
                        help="evaluation split (default: the task's, i.e. the paper's)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a random subset of this many items (drawn with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", choices=("none", "content-free", "dev-prior"),
                        default="none",
                        help="label calibration (classification): content-free = Zhao et al. "
                             "2021 (N/A-style inputs through the template), dev-prior = the "
                             "label prior on the adapter's dev split; costs 3 queries / one dev "
                             "pass per mode")
    parser.add_argument("--dev-size", type=int, default=300,
                        help="dev-prior without an adapter's dev record: rows drawn from train")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="HF engine: (item, choice) sequences per forward")
    add_block_size_arg(parser)
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true")


def parse_modes(text: str | None, has_adapter: bool) -> list[str]:
    if text is None:
        return list(MODES) if has_adapter else ["zero-shot"]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown mode(s) {unknown or [text]}; expected a "
                         f"comma-separated subset of {','.join(MODES)}")
    needs = [m for m in modes if m != "zero-shot"]
    if needs and not has_adapter:
        raise SystemExit(f"--modes {','.join(needs)} need --adapter (icl uses the adapter's "
                         f"demonstrations, deepthink its K/V)")
    return modes


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
                      seed: int = 0) -> tuple[list, dict[str, Any]]:
    """The items whose scores estimate a mode's label prior, and what they were."""
    from vllm_deepthink.tasks import CLASSIFICATION, calibration, dev_split, dev_split_of
    from vllm_deepthink.tasks.scoring import items_from_rows

    if task.kind != CLASSIFICATION:
        raise SystemExit(f"--calibrate {method}: task {task.name!r} is {task.kind}; calibration "
                         f"needs a fixed label set (a classification task)")
    if method == "content-free":
        items = items_from_rows(task, calibration.content_free_rows(task))
        return items, {"inputs": [i.query for i in items]}
    record = adapter.config.task if adapter is not None else None
    if record and "dev_size" in record:
        rows = dev_split_of(task, record)
        source = "the adapter's dev split"
    else:
        rows = dev_split(task, dev_size, seed, exclude=set())
        source = f"{dev_size} train rows drawn with seed {seed}"
    return items_from_rows(task, rows), {"dev_size": len(rows), "dev_source": source}


def evaluate(scorer, tokenizer, task, rows: list[dict], modes: list[str], adapter=None,
             adapter_name: str = ADAPTER_NAME, progress: bool = True,
             calibrate: str = "none", calibration_rows: tuple[list, dict] | None = None
             ) -> dict[str, Any]:
    """Score `rows` in each mode; the metrics/predictions/scores part of the JSON schema.
    With `calibrate`, `calibration_rows` = calibration_items(...)."""
    from vllm_deepthink.tasks import calibration
    from vllm_deepthink.tasks.scoring import (accuracy, encode_items, items_from_rows,
                                              make_plan, predictions)

    items = items_from_rows(task, rows)
    encoded = encode_items(tokenizer, items)
    plan = make_plan(encoded)
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
        result["metrics"][mode] = accuracy(scores, labels)
        result["predictions"][mode] = predictions(scores)
        result["predictions_norm"][mode] = predictions(scores, normalize=True)
        result["scores"][mode] = [[s for s, _ in item] for item in scores]
        if cal_plan is not None:
            cal_scores = scorer.score(cal_plan, **kwargs)
            cal = result["calibration"]
            prior = calibration.log_prior(cal_scores)
            prior_norm = calibration.log_prior(cal_scores, normalize=True)
            cal["log_prior"][mode], cal["log_prior_norm"][mode] = prior, prior_norm
            cal["scores"][mode] = [[s for s, _ in item] for item in cal_scores]
            preds = calibration.calibrated_predictions(scores, prior)
            preds_norm = calibration.calibrated_predictions(scores, prior_norm, normalize=True)
            result["predictions_calibrated"][mode] = preds
            n = len(labels)
            result["metrics"][mode]["acc_calibrated"] = sum(
                p == y for p, y in zip(preds, labels)) / n
            result["metrics"][mode]["acc_norm_calibrated"] = sum(
                p == y for p, y in zip(preds_norm, labels)) / n
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
    from vllm_deepthink.format import DeepThinkAdapter
    from vllm_deepthink.format import ModelFingerprint

    return DeepThinkAdapter.from_pretrained(
        adapter_dir, expected_fingerprint=ModelFingerprint.from_checkpoint(model_dir))


def add_block_size_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block size (prefix-cache granularity): demonstrations and "
                             "a query shared by several choices are cached in whole blocks "
                             "(the CPU backend takes multiples of 32; its default is 128)")


def vllm_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"block_size": args.block_size} if args.engine == "vllm" else {}


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


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from vllm_deepthink.tasks import TaskError, eval_rows
    from vllm_deepthink.tasks.datasets import open_task

    modes = parse_modes(args.modes, args.adapter is not None)
    try:
        task = open_task(args.task_dir, args.dataset)
    except TaskError as exc:
        raise SystemExit(f"vllm-deepthink eval: error: {exc}") from None
    split = args.split or task.eval_split
    rows = eval_rows(task, split, args.limit, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter = load_adapter_for(args.model, args.adapter) if args.adapter else None
    calibration_rows = None
    if args.calibrate != "none":
        calibration_rows = calibration_items(task, tokenizer, args.calibrate, adapter,
                                             args.dev_size, args.seed)
    needed = max_prompt_len(tokenizer, task, rows, adapter, modes,
                            extra_items=calibration_rows[0] if calibration_rows else ())
    dirs = {ADAPTER_NAME: args.adapter} if "deepthink" in modes else {}
    scorer = make_scorer(args.engine, args.model, {ADAPTER_NAME: adapter} if adapter else {},
                         dirs, needed, args.batch_size, progress=not args.no_progress,
                         **vllm_engine_kwargs(args))
    result = evaluate(scorer, tokenizer, task, rows, modes, adapter,
                      progress=not args.no_progress, calibrate=args.calibrate,
                      calibration_rows=calibration_rows)
    settings = {"model": str(args.model),
                "task_dir": str(args.task_dir) if args.task_dir else None,
                "dataset": args.dataset,
                "task": task.to_dict(), "split": split, "limit": args.limit, "seed": args.seed,
                "engine": args.engine, "modes": modes, "block_size": args.block_size,
                "calibrate": args.calibrate,
                "adapter": str(args.adapter) if args.adapter else None,
                "adapter_config": adapter_summary(adapter)}
    scorer.close()
    output = {"schema_version": SCHEMA_VERSION, "settings": settings, **result}
    print(format_table(f"{task.name} ({split}, n={len(rows)}), model {args.model}, "
                       f"engine {args.engine}", result))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
    return 0
