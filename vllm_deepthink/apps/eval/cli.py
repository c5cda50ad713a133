"""`vllm-deepthink eval`: accuracy of zero-shot, ICL and Deep-Thinking on a task.

    vllm-deepthink eval --model models/smollm2-135m --task-dir examples/data/sst2 \\
        --adapter adapters_store/sst2-smollm2-135m --output-json eval.json

This module parses the flags; `run.evaluate_task` evaluates (modes.py: the modes;
calibrate.py: calibration; evaluate.py: scoring; scorers.py: the engines; report.py:
the table and the JSON, whose schema it documents).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_deepthink.apps.errors import UsageError
from vllm_deepthink.apps.eval.modes import MODES, EvalError, check_modes


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from vllm_deepthink.tasks import calibration

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
    parser.add_argument("--calibrate", choices=calibration.METHODS, default="none",
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
    """--modes (comma-separated; default: all three with --adapter, else zero-shot)."""
    if text is None:
        return list(MODES) if has_adapter else ["zero-shot"]
    try:
        return check_modes([m.strip() for m in text.split(",") if m.strip()], has_adapter)
    except EvalError as exc:
        raise UsageError(str(exc)) from None


def add_block_size_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block size (prefix-cache granularity): demonstrations and "
                             "a query shared by several choices are cached in whole blocks "
                             "(the CPU backend takes multiples of 32; its default is 128)")


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.eval.report import format_table, table_title
    from vllm_deepthink.apps.eval.run import evaluate_task
    from vllm_deepthink.tasks import TaskError

    modes = parse_modes(args.modes, args.adapter is not None)
    try:
        output = evaluate_task(
            args.model, task_dir=args.task_dir, dataset=args.dataset, adapter=args.adapter,
            modes=modes, engine=args.engine, split=args.split, limit=args.limit,
            seed=args.seed, calibrate=args.calibrate, dev_size=args.dev_size,
            dev_split=args.dev_split, batch_size=args.batch_size, block_size=args.block_size,
            progress=not args.no_progress)
    except (EvalError, TaskError) as exc:
        raise UsageError(str(exc)) from None
    print(format_table(table_title(output), output))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
    return 0
