"""`vllm-deepthink` console script: one subcommand per module in vllm_deepthink.apps.

Each command module exposes `add_cli_args(parser)` and `main(args)`, like vLLM's
bench modules, and is imported only when its subcommand runs (so `build` and `import` never
import vLLM).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "model": ("vllm_deepthink.apps.model", "convert a packaged GGUF model to an HF directory"),
    "build": ("vllm_deepthink.apps.build", "build a Deep-Thinking adapter (HF, no vLLM)"),
    "import": ("vllm_deepthink.apps.importers",
               "import a PEFT prefix/prompt adapter or raw per-layer K/V (HF, no vLLM)"),
    "compress": ("vllm_deepthink.apps.compress",
                 "compress an adapter to fewer positions for its queries (HF, no vLLM)"),
    "eval": ("vllm_deepthink.apps.eval", "accuracy: zero-shot vs ICL vs Deep-Thinking"),
    "bench": ("vllm_deepthink.apps.bench.cli", "throughput benchmarks"),
    "results": ("vllm_deepthink.apps.results", "build adapters and write the README results table"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-deepthink")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_cli_args(sub_parser)
            sub_parser.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    result = args._main(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
