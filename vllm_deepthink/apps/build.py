"""`vllm-deepthink build`: build a Deep-Thinking adapter with HF transformers (no vLLM)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demos-text", help="file holding the exact demonstration string")
    source.add_argument("--task-dir", help="task directory (train.jsonl, ...) to sample demos from")
    parser.add_argument("--shots-per-class", type=int,
                        help="demos per label (stratified sampling; with --task-dir)")
    parser.add_argument("--seed", type=int, default=0, help="demo sampling and dev split seed")
    parser.add_argument("--iterations", type=int, default=15,
                        help="Deep-Thinking iterations T (1 = plain ICL); default 15")
    parser.add_argument("--optimizer", choices=("momentum", "ema"), default="momentum")
    parser.add_argument("--step-size", type=float, help="momentum step size (default 0.01)")
    parser.add_argument("--beta", type=float, help="momentum coefficient (default 0.9)")
    parser.add_argument("--eta", type=float, help="ema weight of the new K/V (default 0.01)")
    parser.add_argument("--position-mode", choices=("published", "aligned"), default="published",
                        help="aligned: rotate new keys back by L positions (RoPE models only)")
    parser.add_argument("--select-on", choices=("dev", "none"),
                        help="dev: keep the iteration with the best dev accuracy (default with "
                             "--task-dir); none: keep the last (default with --demos-text)")
    parser.add_argument("--dev-size", type=int, default=200,
                        help="dev rows carved from train.jsonl, disjoint from the demos")
    parser.add_argument("--patience", type=int,
                        help="stop after this many iterations without a better dev accuracy")
    parser.add_argument("--batch-size", type=int, default=16, help="dev scoring batch size")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", help="adapter directory (default adapters_store/TASK-MODEL)")
    parser.add_argument("--output-json", help="also write a JSON summary of the build here")


def _fail(message: str) -> None:
    raise SystemExit(f"vllm-deepthink build: error: {message}")


def _optimizer_args(args) -> dict[str, float]:
    if args.optimizer == "momentum":
        if args.eta is not None:
            _fail("--eta belongs to --optimizer ema; with momentum use --step-size / --beta")
        return {"step_size": 0.01 if args.step_size is None else args.step_size,
                "beta": 0.9 if args.beta is None else args.beta}
    if args.step_size is not None or args.beta is not None:
        _fail("--step-size / --beta belong to --optimizer momentum; with ema use --eta")
    return {"eta": 0.01 if args.eta is None else args.eta}


def default_out(args) -> Path:
    source = Path(args.task_dir or args.demos_text)
    name = source.name if args.task_dir else source.stem
    return Path("adapters_store") / f"{name}-{Path(args.model).resolve().name}".lower()


def _check_args(args) -> None:
    if not Path(args.model).is_dir():
        _fail(f"--model {args.model}: no such directory; expected a local HF model directory "
              f"(make one with `vllm-deepthink model`)")
    if args.iterations < 1:
        _fail(f"--iterations must be >= 1, found {args.iterations}")
    if args.task_dir:
        if args.shots_per_class is None or args.shots_per_class < 1:
            _fail("--task-dir needs --shots-per-class K (K >= 1)")
        if not Path(args.task_dir).is_dir():
            _fail(f"--task-dir {args.task_dir}: no such directory")
    else:
        if args.shots_per_class is not None:
            _fail("--shots-per-class applies to --task-dir, not --demos-text")
        if not Path(args.demos_text).is_file():
            _fail(f"--demos-text {args.demos_text}: no such file")
        if args.select_on == "dev":
            _fail("--select-on dev needs --task-dir (the dev split comes from its train.jsonl)")
    select_on = args.select_on or ("dev" if args.task_dir else "none")
    if args.patience is not None and (select_on != "dev" or args.patience < 1):
        _fail("--patience K (K >= 1) needs --select-on dev")
    if args.dev_size < 1:
        _fail(f"--dev-size must be >= 1, found {args.dev_size}")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    optim = _optimizer_args(args)
    select_on = args.select_on or ("dev" if args.task_dir else "none")
    out = Path(args.out) if args.out else default_out(args)

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_deepthink.producers.deepthink import builder

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)

    task_info = None
    dev_items = None
    if args.task_dir:
        from vllm_deepthink import tasks
        from vllm_deepthink.tasks import scoring

        task = tasks.load_task(args.task_dir)
        sample = tasks.sample_demos(task, args.shots_per_class, args.seed)
        demos_text = sample.text
        task_info = {**task.to_dict(), "shots_per_class": args.shots_per_class,
                     "seed": args.seed, "demo_indices": [int(i) for i in sample.indices]}
        if select_on == "dev":
            rows = tasks.dev_split(task, args.dev_size, args.seed, exclude=set(sample.indices))
            dev_items = scoring.items_from_rows(task, rows)
            task_info["dev_size"] = len(dev_items)
    else:
        # newline="": the exact string, \r\n included (read_text would translate it)
        with open(args.demos_text, encoding="utf-8", newline="") as handle:
            demos_text = handle.read()

    demo_ids = builder.tokenize_demos(tokenizer, demos_text)
    try:  # everything checkable fails here, before the weights are loaded
        builder.check_build_supported(config, len(demo_ids), args.position_mode)
    except builder.BuildError as exc:
        _fail(str(exc))

    print(f"demonstrations: {len(demo_ids)} tokens; {args.iterations} iterations, "
          f"{args.optimizer} {optim}, position mode {args.position_mode}, select on {select_on}"
          + (f" ({len(dev_items)} dev items)" if dev_items else ""), file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 local_files_only=True)
    model.eval()

    def report(entry: dict[str, Any]) -> None:
        line = f"iteration {entry['iteration']:>3}"
        if entry["dev_acc"] is not None:
            line += f"  dev acc {entry['dev_acc']:.4f}  acc_norm {entry['dev_acc_norm']:.4f}"
        tqdm.write(line, file=sys.stderr)

    build_args = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    build_args.update(select_on=select_on, out=str(out), **optim)
    adapter = builder.build_adapter(
        model, tokenizer, demos_text, iterations=args.iterations, optimizer=args.optimizer,
        position_mode=args.position_mode, dev_items=dev_items, patience=args.patience,
        task=task_info, build_args=_json_safe(build_args),
        base_model_name_or_path=str(Path(args.model).resolve()),
        score_batch_size=args.batch_size, on_iteration=report, **optim)
    adapter.save_pretrained(out)
    cfg = adapter.config
    summary = {"out": str(out), "prefix_len": cfg.prefix_len,
               "iterations_run": cfg.iterations_run, "selected_iteration": cfg.selected_iteration,
               "selection_trace": cfg.selection_trace}
    print(f"selected iteration {cfg.selected_iteration} of {cfg.iterations_run}; "
          f"adapter saved to {out}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
