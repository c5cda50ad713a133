"""`vllm-deepthink eval`: accuracy of zero-shot, ICL and Deep-Thinking on a task.

The command line of apps/evaluation.py (the modes, engines and calibration are described
there): it opens the task, loads the adapter, builds the scorer, runs `evaluate` and
writes the table and the JSON.

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
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.evaluation import (
    ADAPTER_NAME,
    MODES,
    SCHEMA_VERSION,
    EvalError,
    adapter_summary,
    calibration_items,
    evaluate,
    format_table,
    load_adapter_for,
    make_scorer,
    max_prompt_len,
)


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
                        help="dev-prior without an adapter's dev record: rows drawn from "
                             "--dev-split")
    parser.add_argument("--dev-split", choices=("train", "validation", "test"), default="train",
                        help="dev-prior without an adapter's dev record: the split its rows "
                             "come from (not the evaluated one; default train)")
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


def add_block_size_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block size (prefix-cache granularity): demonstrations and "
                             "a query shared by several choices are cached in whole blocks "
                             "(the CPU backend takes multiples of 32; its default is 128)")


def vllm_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"block_size": args.block_size} if args.engine == "vllm" else {}


def settings_of(args: argparse.Namespace, task, split: str, modes: list[str],
                adapter) -> dict[str, Any]:
    """The `settings` of the JSON: what was evaluated, how."""
    return {"model": str(args.model),
            "task_dir": str(args.task_dir) if args.task_dir else None,
            "dataset": args.dataset,
            "task": task.to_dict(), "split": split, "limit": args.limit, "seed": args.seed,
            "engine": args.engine, "modes": modes, "block_size": args.block_size,
            "calibrate": args.calibrate,
            "adapter": str(args.adapter) if args.adapter else None,
            "adapter_config": adapter_summary(adapter)}


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
        try:
            calibration_rows = calibration_items(task, tokenizer, args.calibrate, adapter,
                                                 args.dev_size, args.seed, args.dev_split,
                                                 evaluated=split)
        except (EvalError, TaskError) as exc:
            raise SystemExit(f"vllm-deepthink eval: error: {exc}") from None
    needed = max_prompt_len(tokenizer, task, rows, adapter, modes,
                            extra_items=calibration_rows[0] if calibration_rows else ())
    dirs = {ADAPTER_NAME: args.adapter} if "deepthink" in modes else {}
    scorer = make_scorer(args.engine, args.model, {ADAPTER_NAME: adapter} if adapter else {},
                         dirs, needed, args.batch_size, progress=not args.no_progress,
                         **vllm_engine_kwargs(args))
    try:
        result = evaluate(scorer, tokenizer, task, rows, modes, adapter,
                          progress=not args.no_progress, calibrate=args.calibrate,
                          calibration_rows=calibration_rows)
    finally:
        scorer.close()
    settings = settings_of(args, task, split, modes, adapter)
    output = {"schema_version": SCHEMA_VERSION, "settings": settings, **result}
    print(format_table(f"{task.name} ({split}, n={len(rows)}), model {args.model}, "
                       f"engine {args.engine}", result))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
    return 0
