"""`vllm-deepthink compress`: any adapter of L positions -> an ordinary adapter of k < L
positions (HF, no vLLM), for the queries it will serve.

  vllm-deepthink compress SRC --model BASE --out DST (--prefix-len K | --ratio R)
      (--task-dir DIR | --dataset SPEC | --queries FILE)
      [--distill [--steps N] [--lr LR] [--teacher source|calibrated] [--teacher-seeds 0,1,2]]

Selection keeps, per layer and KV head, the k positions the queries attend to most (the
first position always), with their keys rotated so every query/key distance is the
source's. --distill then trains the k positions' K/V (the model frozen) to reproduce the
teacher's next-token distributions on the queries. The queries are a task's train rows
rendered with its template (labels unused; the source's demonstration rows excluded) or
--queries FILE (one per line; a .jsonl file: one JSON string per line). The output is
served like any adapter: `vllm serve BASE --deepthink-adapter NAME=DST`. `vllm-deepthink
build ... --prefix-len K` builds and compresses in one command with these flags (there,
--compress-dev-size and --distill-patience; --dev-size and --patience are the build's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.errors import UsageError


# The flags of `compress` that `build --prefix-len` names otherwise (build's --dev-size and
# --patience are its own build's): setting -> (compress's flags, build's flag).
RENAMED = {"dev_size": (("--dev-size", "--compress-dev-size"), "--compress-dev-size"),
           "patience": (("--patience", "--distill-patience"), "--distill-patience")}


def add_compress_args(parser: argparse.ArgumentParser, *, for_build: bool = False) -> None:
    """The compression flags, one definition for `compress` and `build --prefix-len`: the
    size (--prefix-len / --ratio; required by `compress`), the queries, the distillation
    and its teacher. Both commands use their own --seed and --batch-size for it too."""
    from vllm_deepthink.producers.compress.distill import POSITIONS, DistillSettings
    from vllm_deepthink.producers.compress.from_task import PRIORS, TEACHERS
    from vllm_deepthink.producers.compress.queries import DEFAULT_COUNT

    d = DistillSettings()
    group = parser.add_argument_group(
        "compression", "build, then compress the adapter to k positions (as `vllm-deepthink "
        "compress` does; docs/compressing.md)" if for_build else None)
    size = group.add_mutually_exclusive_group(required=not for_build)
    size.add_argument("--prefix-len", type=int, help="k, the positions to keep (2 <= k < L)")
    size.add_argument("--ratio", type=float, help="keep k = round(L / R) positions (R > 1)")
    group.add_argument("--queries", help="file of queries: one per line (.jsonl: one JSON "
                                         "string or {\"query\": ...} per line)")
    group.add_argument("--num-queries", type=int, default=DEFAULT_COUNT,
                       help=f"train rows drawn as queries from the task (default "
                            f"{DEFAULT_COUNT}; never the demonstrations)")
    flags = {name: (build,) if for_build else own for name, (own, build) in RENAMED.items()}
    group.add_argument(*flags["dev_size"], dest="compress_dev_size", type=int, default=None,
                       help="queries held out for the agreement and early stopping "
                            "(default min(64, queries / 4))")
    group.add_argument("--distill", action="store_true",
                       help="train the kept positions' K/V toward the teacher")
    group.add_argument("--steps", type=int, default=d.steps,
                       help=f"distillation steps (default {d.steps})")
    group.add_argument("--lr", type=float, default=d.lr, help=f"Adam lr (default {d.lr})")
    group.add_argument("--eval-every", type=int, default=d.eval_every,
                       help=f"steps between dev evaluations (default {d.eval_every})")
    group.add_argument(*flags["patience"], dest="distill_patience", type=int,
                       default=d.patience,
                       help=f"stop after this many evaluations without a lower dev "
                            f"KL (default {d.patience}; 0: never)")
    group.add_argument("--distill-positions", choices=POSITIONS, default=d.positions,
                       help="where the KL is taken: answer (the answer position over "
                            "the label tokens), last (the answer position, whole "
                            "vocabulary), all (every query position); auto (default): "
                            "answer when the labels are one token each, else all")
    group.add_argument("--top-k", type=int, default=d.top_k,
                       help=f"teacher tokens kept per position (default {d.top_k})")
    group.add_argument("--teacher", choices=TEACHERS, default="source",
                       help="source (default): the source adapter; calibrated: the source "
                            "with its label prior divided out at the answer position")
    group.add_argument("--calibration", dest="calibration_prior", choices=PRIORS,
                       default="content-free",
                       help="the prior of --teacher calibrated (default content-free)")
    group.add_argument("--teacher-seeds",
                       help="comma-separated demonstration seeds: the teacher is the average "
                            "of their prefixes (needs the source's task); with --teacher "
                            "calibrated, each draw's own label prior (over the train "
                            "queries) is divided out first")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("source", metavar="SRC",
                        help="the adapter to compress: a directory or a hub id (any method)")
    parser.add_argument("--model", required=True,
                        help="its base model: a local HF directory or a hub id")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--task-dir", help="task directory whose train rows give the queries")
    parser.add_argument("--dataset", help="rows from the `datasets` library (as `build`)")
    parser.add_argument("--seed", type=int, default=0,
                        help="query draw, dev split and batch order seed")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="queries per step and per scoring batch (default 16)")
    add_compress_args(parser)
    parser.add_argument("--output-json", help="also write a JSON summary here")


def _fail(message: str) -> None:
    raise UsageError(message)


def compress_settings(args):
    """CompressSettings from the flags of add_compress_args (and --seed, --batch-size);
    None when `build` was given no --prefix-len / --ratio. The queries file is read here."""
    from vllm_deepthink.producers.compress import queries as q
    from vllm_deepthink.producers.compress.distill import DistillSettings
    from vllm_deepthink.producers.compress.from_task import CompressSettings

    if args.prefix_len is None and args.ratio is None:
        return None
    seeds = None
    if args.teacher_seeds is not None:
        try:
            seeds = [int(s) for s in args.teacher_seeds.split(",") if s.strip()]
        except ValueError:
            _fail(f"--teacher-seeds must be comma-separated integers, found "
                  f"{args.teacher_seeds!r}")
    texts = info = None
    if args.queries:
        try:
            texts = q.read_queries_file(args.queries)
        except q.QueriesError as exc:
            _fail(f"--queries: {exc}")
        info = {"source": "file", "file": str(args.queries)}
    distill = (DistillSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                               eval_every=args.eval_every, patience=args.distill_patience,
                               top_k=args.top_k, positions=args.distill_positions,
                               seed=args.seed) if args.distill else None)
    return CompressSettings(
        prefix_len=args.prefix_len, ratio=args.ratio, queries=texts, queries_info=info,
        num_queries=args.num_queries, dev_size=args.compress_dev_size, distill=distill,
        teacher=args.teacher, calibration_prior=args.calibration_prior, teacher_seeds=seeds,
        seed=args.seed, batch_size=args.batch_size)


def flag_message(message: str, for_build: bool = False) -> str:
    """A library message of the compression with the settings `build` names otherwise
    written as its flags (the rest are mapped by apps/cli.py)."""
    for name, (own, build) in RENAMED.items():
        message = message.replace(f"`{name}`", build if for_build else own[0])
    return message


def check_settings(settings, has_task: bool, for_build: bool = False) -> None:
    """`settings` (compress_settings) checked before anything loads, else UsageError."""
    from vllm_deepthink.producers.compress import CompressError

    try:
        settings.check(has_task=has_task)
    except CompressError as exc:
        _fail(flag_message(str(exc), for_build))


def summary(adapter, out: Path, seconds: float) -> dict[str, Any]:
    record = adapter.config.compression
    distill = record["distill"] or {}
    return {"out": str(out), "source_prefix_len": record["source_prefix_len"],
            "prefix_len": record["prefix_len"], "ratio": record["ratio"],
            "dev": record["dev"], "distill_steps": distill.get("steps_run"),
            "best_step": distill.get("best_step"), "stopped": distill.get("stopped"),
            "label_calibration": record["label_calibration"], "digest": adapter.digest,
            "seconds": round(seconds, 3)}


def no_queries_message(adapter) -> str:
    """Why `compress` has no queries for `adapter`, and what to give."""
    cfg = adapter.config
    what = (f"it was built from task {cfg.task['name']!r}: give --task-dir / --dataset of "
            f"that task, or --queries FILE" if cfg.task else
            f"an adapter of method {cfg.method!r} has no task record: give --queries "
            f"FILE (one query per line, rendered as the adapter is queried) or --task-dir")
    return f"no queries to compress for; {what}"


def report_step(entry: dict[str, Any]) -> None:
    """A distillation step's dev evaluation, on stderr (compress_adapter's on_step)."""
    from tqdm.auto import tqdm

    if "dev_kl" in entry:
        tqdm.write(f"step {entry['step']:>4}  loss {entry['loss']:.4f}  dev KL "
                   f"{entry['dev_kl']:.4f}  dev agreement {entry['dev_agreement']:.3f}",
                   file=sys.stderr)


def write_result(compressed, out: Path, seconds: float, output_json: str | None) -> None:
    """The summary line of a compressed adapter saved to `out` (and its JSON)."""
    result = summary(compressed, out, seconds)
    dev = result["dev"]
    print(f"compressed {result['source_prefix_len']} -> {result['prefix_len']} positions "
          f"(x{result['ratio']:g}); dev agreement with the {dev['teacher']} teacher "
          f"{dev['final']['agreement']:.3f} (selection {dev['selection']['agreement']:.3f}), "
          f"KL {dev['final']['kl']:.4f}; {result['seconds']:.1f} s; adapter saved to {out}")
    if output_json:
        Path(output_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    has_task = bool(args.task_dir or args.dataset)
    if has_task and args.queries:
        _fail("give the queries as a task (--task-dir / --dataset) or --queries FILE, not both")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_deepthink import tasks
    from vllm_deepthink.format import AdapterFormatError, DeepThinkAdapter
    from vllm_deepthink.format.hub import HubResolutionError
    from vllm_deepthink.producers.base_model import resolve_model
    from vllm_deepthink.producers.compress import CompressError, compress_for_task
    from vllm_deepthink.tasks.datasets import open_task

    settings = compress_settings(args)
    try:
        adapter = DeepThinkAdapter.from_pretrained(args.source)
        model_dir, _ = resolve_model(args.model)
    except (AdapterFormatError, HubResolutionError) as exc:
        _fail(str(exc))
    if not has_task and settings.queries is None:
        _fail(no_queries_message(adapter))
    check_settings(settings, has_task)
    try:
        task = open_task(args.task_dir, args.dataset) if has_task else None
    except tasks.TaskError as exc:
        _fail(str(exc))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    build_args = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    try:
        compressed = compress_for_task(
            adapter, model, tokenizer, settings, task=task,
            build_args=json.loads(json.dumps(build_args, default=str)), on_step=report_step)
    except CompressError as exc:
        _fail(flag_message(str(exc)))
    out = Path(args.out)
    compressed.save_pretrained(out)
    write_result(compressed, out, time.perf_counter() - start, args.output_json)
    return 0
