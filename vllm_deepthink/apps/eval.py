"""`vllm-deepthink eval`: accuracy of zero-shot, ICL and Deep-Thinking on a task.

Modes (every mode scores the same items, choice by choice, see scoring.py):
  zero-shot  the query alone, after the tokenizer's special prefix (BOS if it adds one,
             i.e. the ids of an empty demonstration string);
  icl        the adapter's own demonstration ids (config.demo_token_ids) before the query;
  deepthink  the adapter's K/V as a prefix (positions 0..L-1), the query from position L.

Engines: `vllm` (one engine for all modes; Deep-Thinking through the vllm_deepthink
plugin) or `hf` (transformers, scoring.score_items_hf).

JSON written by --output-json (schema_version 1):
  settings:         model, task_dir, task (tasks.Task.to_dict()), split, limit, seed,
                    engine, modes, adapter (path or null), adapter_config (prefix_len,
                    selected_iteration, iterations_run, optimizer, optimizer_params,
                    position_mode, demos_text)
  prefix_tokens:    {mode: tokens before the query (0/1 for zero-shot, L otherwise)}
  metrics:          {mode: {"acc", "acc_norm", "n"}}; acc ranks choices by summed
                    logprob, acc_norm by mean logprob per token
  predictions:      {mode: [argmax choice index by summed logprob, per item]}
  predictions_norm: {mode: [argmax choice index by mean logprob, per item]}
  labels:           [gold choice index, per item]  (items in eval-split file order)
  seconds:          {mode: scoring wall time}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MODES = ("zero-shot", "icl", "deepthink")
SCHEMA_VERSION = 1
ADAPTER_NAME = "eval"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = "Accuracy of zero-shot vs ICL vs Deep-Thinking on one task."
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--task-dir", required=True,
                        help="task directory (a built-in task of ../shared/data or one with "
                             "task.json)")
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


def evaluate(scorer, tokenizer, task, rows: list[dict], modes: list[str], adapter=None,
             adapter_name: str = ADAPTER_NAME, progress: bool = True) -> dict[str, Any]:
    """Score `rows` in each mode; the metrics/predictions part of the JSON schema."""
    from vllm_deepthink.tasks.scoring import accuracy, encode_items, items_from_rows, predictions

    items = items_from_rows(task, rows)
    encoded = encode_items(tokenizer, items)
    labels = [item.label for item in items]
    result: dict[str, Any] = {"prefix_tokens": {}, "metrics": {}, "predictions": {},
                              "predictions_norm": {}, "labels": labels, "seconds": {}}
    for mode in modes:
        kwargs = mode_prefix(mode, tokenizer, adapter)
        result["prefix_tokens"][mode] = kwargs.pop("prefix_len")
        if "adapter" in kwargs:
            kwargs["adapter"] = adapter_name
        start = time.perf_counter()
        if progress:
            print(f"[eval] {task.name}: {mode} on {len(items)} items ({scorer.engine})",
                  flush=True)
        scores = scorer.score(encoded, **kwargs)
        result["seconds"][mode] = time.perf_counter() - start
        result["metrics"][mode] = accuracy(scores, labels)
        result["predictions"][mode] = predictions(scores)
        result["predictions_norm"][mode] = predictions(scores, normalize=True)
    return result


def max_prompt_len(tokenizer, task, rows, adapter, modes) -> int:
    """Tokens of the longest prompt any mode sends (prefix + query + choice)."""
    from vllm_deepthink.tasks.scoring import encode_items, items_from_rows

    encoded = encode_items(tokenizer, items_from_rows(task, rows))
    longest = max(len(e.query_ids) + max(len(c) for c in e.choice_ids) for e in encoded)
    prefix = max(mode_prefix(m, tokenizer, adapter)["prefix_len"] for m in modes)
    return prefix + longest


def engine_max_len(needed: int) -> int:
    # One generated token on top; a multiple of the CPU block size (128).
    return max(256, -(-(needed + 1) // 128) * 128)


def format_table(title: str, result: dict[str, Any]) -> str:
    lines = [title, f"{'mode':<10} {'acc':>7} {'acc_norm':>9} {'n':>6} {'prefix':>7} {'sec':>7}"]
    for mode, m in result["metrics"].items():
        lines.append(f"{mode:<10} {m['acc']:>7.4f} {m['acc_norm']:>9.4f} {m['n']:>6} "
                     f"{result['prefix_tokens'][mode]:>7} {result['seconds'][mode]:>7.1f}")
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

    from vllm_deepthink.tasks import eval_rows, load_task

    modes = parse_modes(args.modes, args.adapter is not None)
    task = load_task(args.task_dir)
    split = args.split or task.eval_split
    rows = eval_rows(task, split, args.limit, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter = load_adapter_for(args.model, args.adapter) if args.adapter else None
    needed = max_prompt_len(tokenizer, task, rows, adapter, modes)
    dirs = {ADAPTER_NAME: args.adapter} if "deepthink" in modes else {}
    scorer = make_scorer(args.engine, args.model, {ADAPTER_NAME: adapter} if adapter else {},
                         dirs, needed, args.batch_size, progress=not args.no_progress,
                         **vllm_engine_kwargs(args))
    result = evaluate(scorer, tokenizer, task, rows, modes, adapter,
                      progress=not args.no_progress)
    settings = {"model": str(args.model), "task_dir": str(args.task_dir),
                "task": task.to_dict(), "split": split, "limit": args.limit, "seed": args.seed,
                "engine": args.engine, "modes": modes, "block_size": args.block_size,
                "adapter": str(args.adapter) if args.adapter else None,
                "adapter_config": adapter_summary(adapter)}
    if hasattr(scorer, "close"):
        scorer.close()
    output = {"schema_version": SCHEMA_VERSION, "settings": settings, **result}
    print(format_table(f"{task.name} ({split}, n={len(rows)}), model {args.model}, "
                       f"engine {args.engine}", result))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
    return 0
