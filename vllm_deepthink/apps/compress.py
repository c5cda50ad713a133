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
served like any adapter: `vllm serve BASE --deepthink-adapter NAME=DST`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.errors import UsageError


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from vllm_deepthink.producers.compress.distill import POSITIONS, DistillSettings
    from vllm_deepthink.producers.compress.queries import DEFAULT_COUNT

    d = DistillSettings()
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("source", metavar="SRC",
                        help="the adapter to compress: a directory or a hub id (any method)")
    parser.add_argument("--model", required=True,
                        help="its base model: a local HF directory or a hub id")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--prefix-len", type=int, help="k, the positions to keep (2 <= k < L)")
    size.add_argument("--ratio", type=float, help="keep k = round(L / R) positions (R > 1)")
    parser.add_argument("--task-dir", help="task directory whose train rows give the queries")
    parser.add_argument("--dataset", help="rows from the `datasets` library (as `build`)")
    parser.add_argument("--queries", help="file of queries: one per line (.jsonl: one JSON "
                                          "string or {\"query\": ...} per line)")
    parser.add_argument("--num-queries", type=int, default=DEFAULT_COUNT,
                        help=f"train rows drawn as queries from the task (default "
                             f"{DEFAULT_COUNT})")
    parser.add_argument("--dev-size", type=int, default=None,
                        help="queries held out for the agreement and early stopping "
                             "(default min(64, queries / 4))")
    parser.add_argument("--seed", type=int, default=0,
                        help="query draw, dev split and batch order seed")
    parser.add_argument("--distill", action="store_true",
                        help="train the kept positions' K/V toward the teacher")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help=f"distillation steps (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam lr (default {d.lr})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"queries per step and per scoring batch (default {d.batch_size})")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help=f"steps between dev evaluations (default {d.eval_every})")
    parser.add_argument("--patience", type=int, default=d.patience,
                        help=f"stop after this many evaluations without a better dev "
                             f"agreement / KL (default {d.patience}; 0: never)")
    parser.add_argument("--distill-positions", choices=POSITIONS, default=d.positions,
                        help="where the KL is taken: answer (the answer position over "
                             "the label tokens), last (the answer position, whole "
                             "vocabulary), all (every query position); auto (default): "
                             "answer when the labels are one token each, else all")
    parser.add_argument("--top-k", type=int, default=d.top_k,
                        help=f"teacher tokens kept per position (default {d.top_k})")
    parser.add_argument("--teacher", choices=("source", "calibrated"), default="source",
                        help="source (default): the source adapter; calibrated: the source "
                             "with its label prior divided out at the answer position")
    parser.add_argument("--calibration", choices=("content-free", "dev-prior"),
                        default="content-free",
                        help="the prior of --teacher calibrated (default content-free)")
    parser.add_argument("--teacher-seeds",
                        help="comma-separated demonstration seeds: the teacher is the average "
                             "of their prefixes (needs the source's task)")
    parser.add_argument("--output-json", help="also write a JSON summary here")


def _fail(message: str) -> None:
    raise UsageError(message)


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"--teacher-seeds must be comma-separated integers, found {text!r}")


def check_args(args) -> None:
    has_task = bool(args.task_dir or args.dataset)
    if has_task and args.queries:
        _fail("give the queries as a task (--task-dir / --dataset) or --queries FILE, not both")
    seeds = _seeds(args.teacher_seeds)
    distill_flags = [flag for flag, on in (("--teacher calibrated", args.teacher != "source"),
                                           ("--teacher-seeds", seeds is not None)) if on]
    if distill_flags and not args.distill:
        _fail(f"{' and '.join(distill_flags)} choose a distillation teacher; add --distill")
    if args.teacher != "source" and seeds is not None:
        _fail("--teacher calibrated and --teacher-seeds are two different teachers; give one")
    if seeds is not None and not has_task:
        _fail("--teacher-seeds draws demonstrations from the source's task: give --task-dir "
              "/ --dataset")
    if args.num_queries < 2:
        _fail(f"--num-queries must be >= 2, found {args.num_queries}")


def _queries(args, adapter):
    """(queries, their record, label choices, the task or None)."""
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.compress import queries as q

    if args.queries:
        try:
            texts = q.read_queries_file(args.queries)
        except q.QueriesError as exc:
            _fail(f"--queries: {exc}")
        return texts, {"source": "file", "file": str(args.queries)}, None, None
    if not (args.task_dir or args.dataset):
        cfg = adapter.config
        what = (f"it was built from task {cfg.task['name']!r}: give --task-dir / --dataset of "
                f"that task, or --queries FILE" if cfg.task else
                f"an adapter of method {cfg.method!r} has no task record: give --queries "
                f"FILE (one query per line, rendered as the adapter is queried) or --task-dir")
        _fail(f"no queries to compress for; {what}")
    from vllm_deepthink.tasks.datasets import open_task

    try:
        task = open_task(args.task_dir, args.dataset)
        exclude = (adapter.config.task or {}).get("demo_indices", [])
        texts, info = q.task_queries(task, args.num_queries, args.seed, exclude)
    except (tasks.TaskError, q.QueriesError) as exc:
        _fail(str(exc))
    return texts, info, q.task_choices(task), task


def summary(adapter, out: Path, seconds: float) -> dict[str, Any]:
    record = adapter.config.compression
    distill = record["distill"] or {}
    return {"out": str(out), "source_prefix_len": record["source_prefix_len"],
            "prefix_len": record["prefix_len"], "ratio": record["ratio"],
            "dev": record["dev"], "distill_steps": distill.get("steps_run"),
            "best_step": distill.get("best_step"), "stopped": distill.get("stopped"),
            "label_calibration": record["label_calibration"], "digest": adapter.digest,
            "seconds": round(seconds, 3)}


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_args(args)
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_deepthink.format import AdapterFormatError, DeepThinkAdapter
    from vllm_deepthink.format.hub import HubResolutionError
    from vllm_deepthink.producers.base_model import resolve_model
    from vllm_deepthink.producers.compress import CompressError, compress_adapter, teachers
    from vllm_deepthink.producers.compress.distill import DistillSettings

    try:
        adapter = DeepThinkAdapter.from_pretrained(args.source)
        model_dir, _ = resolve_model(args.model)
    except (AdapterFormatError, HubResolutionError) as exc:
        _fail(str(exc))
    texts, info, choices, task = _queries(args, adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        settings = (DistillSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                    eval_every=args.eval_every, patience=args.patience,
                                    top_k=args.top_k, positions=args.distill_positions,
                                    seed=args.seed) if args.distill else None)
    except ValueError as exc:
        _fail(str(exc))
    teacher = args.teacher
    build_args = {k: v for k, v in vars(args).items() if not k.startswith("_")}

    def report(entry: dict[str, Any]) -> None:
        if "dev_kl" in entry:
            tqdm.write(f"step {entry['step']:>4}  loss {entry['loss']:.4f}  dev KL "
                       f"{entry['dev_kl']:.4f}  dev agreement {entry['dev_agreement']:.3f}",
                       file=sys.stderr)

    try:
        seeds = _seeds(args.teacher_seeds)
        if seeds is not None:
            teacher = teachers.ensemble_teacher(model, tokenizer, task, adapter, seeds)
        compressed = compress_adapter(
            adapter, model, tokenizer, texts, prefix_len=args.prefix_len, ratio=args.ratio,
            distill=settings, teacher=teacher,
            calibration_prior=args.calibration, choices=choices, dev_size=args.dev_size,
            seed=args.seed, batch_size=args.batch_size, queries_info=info,
            build_args=json.loads(json.dumps(build_args, default=str)), on_step=report)
    except (CompressError, teachers.TeacherError) as exc:
        _fail(str(exc))
    out = Path(args.out)
    compressed.save_pretrained(out)
    result = summary(compressed, out, time.perf_counter() - start)
    dev = result["dev"]
    print(f"compressed {result['source_prefix_len']} -> {result['prefix_len']} positions "
          f"(x{result['ratio']:g}); dev agreement with the {dev['teacher']} teacher "
          f"{dev['final']['agreement']:.3f} (selection {dev['selection']['agreement']:.3f}), "
          f"KL {dev['final']['kl']:.4f}; {result['seconds']:.1f} s; adapter saved to {out}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
