"""`vllm-deepthink import peft|past-kv`: KV prefixes made elsewhere as adapters (HF, no vLLM).

  peft      a PEFT prompt-learning adapter directory (PREFIX_TUNING with or without
            prefix_projection, PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING with
            --task-id, CPT, CARTRIDGE); needs `pip install 'vllm-deepthink[peft]'`
  past-kv   a safetensors file of per-layer K/V: layers.{i}.key / layers.{i}.value, each
            [num_kv_heads, L, head_dim] or [1, num_kv_heads, L, head_dim], K as the
            model's cache holds it (post-RoPE) at positions 0..L-1

The result is an adapter directory served like any other:
`vllm serve BASE --deepthink-adapter NAME=OUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    sources = parser.add_subparsers(dest="source", required=True)

    peft = sources.add_parser(
        "peft", help="a PEFT prefix-tuning / prompt-tuning / P-tuning adapter directory",
        description="Import a PEFT prompt-learning adapter (the directory written by "
                    "PeftModel.save_pretrained; adapter_model.safetensors only, pickles are "
                    "refused). K/V are computed with PEFT's own code in float32.")
    peft.add_argument("adapter_dir", help="PEFT adapter directory (adapter_config.json, "
                                          "adapter_model.safetensors)")
    _common(peft)
    peft.set_defaults(_parser=peft)  # apps/cli.py: the flags of this parser name errors
    peft.add_argument("--task-id", type=int, default=None,
                      help="MULTITASK_PROMPT_TUNING: the task whose soft prompt to import "
                           "(one adapter per task)")
    peft.add_argument("--query-special-tokens", choices=("auto", "none"), default="auto",
                      help="auto (default): the adapter was used as PeftModel(tokenizer(text)), "
                           "so the tokenizer's leading special tokens (BOS) follow the virtual "
                           "tokens; their K/V are computed through PEFT and end the prefix. "
                           "none: it was used on ids without special tokens")
    peft.add_argument("--allow-base-mismatch", action="store_true",
                      help="import although the adapter's base_model_name_or_path names "
                           "another model (same weights under another name); the geometry "
                           "is still checked and the adapter is bound to --model")
    peft.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="dtype of the stored K/V (computed in float32); default float32")

    past_kv = sources.add_parser(
        "past-kv", help="a safetensors file of per-layer K/V (past_key_values)",
        description="Import raw per-layer K/V. Input: one safetensors file holding, for "
                    "every layer i of --model, layers.{i}.key and layers.{i}.value of shape "
                    "[num_kv_heads, L, head_dim] (or HF's cache layout [1, num_kv_heads, L, "
                    "head_dim]), K exactly as the model's attention cache holds it for "
                    "positions 0..L-1 (post-RoPE for RoPE models), float32/float16/bfloat16, "
                    "finite. The served query starts at position L and is tokenized without "
                    "special tokens, so put BOS's K/V in the prefix if the model needs it.")
    past_kv.add_argument("file", help="safetensors file of layers.{i}.key / layers.{i}.value")
    _common(past_kv)
    past_kv.set_defaults(_parser=past_kv)
    past_kv.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                         help="dtype of the stored K/V; auto (default) keeps the file's")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="the base model: a local HF directory or a hub id (ORG/NAME, "
                             "resolved through the Hugging Face cache); the adapter is bound "
                             "to its fingerprint")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--output-json", default=None,
                        help="also write a JSON summary (method, out, prefix_len, digest, "
                             "provenance) here")


def _summary(adapter, out: Path, seconds: float) -> dict[str, Any]:
    c = adapter.config
    return {"method": c.method, "out": str(out), "prefix_len": c.prefix_len,
            "num_virtual_tokens": c.num_virtual_tokens,
            "prefix_special_ids": c.prefix_special_ids, "dtype": c.dtype,
            "base_model_name_or_path": c.base_model_name_or_path, "digest": adapter.digest,
            "provenance": c.provenance, "seconds": seconds}


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.errors import UsageError
    from vllm_deepthink.format import AdapterFormatError
    from vllm_deepthink.producers.kv_import import ImportRefusedError

    start = time.perf_counter()
    build_args = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    try:
        if args.source == "peft":
            from vllm_deepthink.producers.peft import import_peft_adapter

            adapter = import_peft_adapter(
                args.adapter_dir, args.model, task_id=args.task_id,
                query_special_tokens=args.query_special_tokens,
                allow_base_mismatch=args.allow_base_mismatch, dtype=args.dtype,
                build_args=build_args)
        else:
            from vllm_deepthink.producers.past_kv import import_past_kv

            adapter = import_past_kv(args.file, args.model,
                                     dtype=None if args.dtype == "auto" else args.dtype,
                                     build_args=build_args)
        out = Path(args.out)
        adapter.save_pretrained(out)
    except (ImportRefusedError, AdapterFormatError) as exc:
        raise UsageError(str(exc)) from None
    summary = _summary(adapter, out, time.perf_counter() - start)
    c = adapter.config
    specials = f" + special ids {c.prefix_special_ids}" if c.prefix_special_ids else ""
    print(f"{c.method}: {c.num_virtual_tokens} virtual positions{specials} = prefix of "
          f"{c.prefix_len}; adapter saved to {out}", file=sys.stderr)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0
