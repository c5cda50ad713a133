"""`vllm-deepthink` console script: one subcommand per module in vllm_deepthink.apps.

Each command module exposes `add_cli_args(parser)` and `main(args)`, like vLLM's
bench modules, and is imported only when its subcommand runs (so `build` and `import` never
import vLLM). A command refuses its input with `errors.UsageError`, printed here the same
way for every command: `vllm-deepthink COMMAND: error: MESSAGE`, the parameter names of a
library message (`task_id`) written as the command's flags (--task-id).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_deepthink.apps.errors import UsageError

COMMANDS = {
    "model": ("vllm_deepthink.apps.model", "convert a packaged GGUF model to an HF directory"),
    "build": ("vllm_deepthink.apps.build", "build a Deep-Thinking adapter (HF, no vLLM)"),
    "demo": ("vllm_deepthink.apps.demo.cli",
             "build the demo adapters of `make serve` and print what they score"),
    "import": ("vllm_deepthink.apps.importers",
               "import a PEFT prefix/prompt adapter or raw per-layer K/V (HF, no vLLM)"),
    "compress": ("vllm_deepthink.apps.compress",
                 "compress an adapter to fewer positions for its queries (HF, no vLLM)"),
    "eval": ("vllm_deepthink.apps.eval.cli", "accuracy: zero-shot vs ICL vs Deep-Thinking"),
    "bench": ("vllm_deepthink.apps.bench.cli", "throughput benchmarks"),
    "results": ("vllm_deepthink.apps.results.cli", "build adapters and write the README results table"),
    "compression": ("vllm_deepthink.apps.compression.cli",
                    "the compression table: compressed adapters against their source (HF)"),
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
            # _parser: the (sub)command's parser; a command with subcommands sets its own
            sub_parser.set_defaults(_main=module.main, _parser=sub_parser)
    return parser


def with_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with each backticked parameter name (`task_id`) of a flag of `parser`
    written as that flag (--task-id)."""
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags:
            message = message.replace(f"`{action.dest}`", flags[0])
    return message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        result = args._main(args)
    except UsageError as exc:
        raise SystemExit(f"{args._parser.prog}: error: {with_flags(str(exc), args._parser)}"
                         ) from None
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
