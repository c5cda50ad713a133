"""`vllm-deepthink demo`: the demo adapters of `make serve`, built when missing, and a
table of what they score (T, dev accuracy against ICL and zero-shot, held-out test).

    vllm-deepthink demo --model models/smollm2-135m              # examples/demo.jsonl
    vllm serve models/smollm2-135m --dtype float32 \\
        --deepthink-adapter sst2=adapters_store/sst2-smollm2 trec=adapters_store/trec-smollm2

This module parses the flags; `run.build_demo` builds and scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_deepthink.apps.demo.run import DEFAULT_MANIFEST
from vllm_deepthink.apps.errors import UsageError


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Build the demo adapters (a manifest of recorded recipes, small "
                          "dev splits, capped T) when missing and print what they score.")
    parser.add_argument("--model", required=True,
                        help="HF model: a local directory or a hub id (ORG/NAME)")
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST,
                        help=f"the demo manifest, one task per line (default {DEFAULT_MANIFEST}; "
                             f"the format of `build --manifest`)")
    parser.add_argument("--out-dir", default="adapters_store",
                        help="the store: one adapter per OUT_DIR/NAME (default adapters_store)")
    parser.add_argument("--no-test", action="store_true",
                        help="score on the dev split only (not on the task's test rows)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output-json", help="also write the summary here")


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.build import builder_errors
    from vllm_deepthink.apps.demo.run import build_demo

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, found {args.threads}")
    try:
        summary = build_demo(args.model, args.out_dir, args.manifest, test=not args.no_test,
                             threads=args.threads, progress=not args.no_progress)
    except builder_errors() as exc:
        raise UsageError(str(exc)) from None
    print(summary.table(), flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n",
                                          encoding="utf-8")
    return 0
