"""`vllm serve` flags: `--deepthink-adapter NAME=PATH`, `--deepthink-adapter-dir DIR`.

`add_cli_args` adds them to vLLM's engine parser (patches.openai_server) and
`apply_adapter_args` folds them into the engine arguments, exactly as
`api.engine_args(adapters=...)` builds them; bad adapters stop the server at start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from vllm_deepthink.format import CONFIG_NAME, AdapterFormatError
from vllm_deepthink.plugin import api
from vllm_deepthink.plugin.frontend import AdapterRegistry, AdapterRequestError
from vllm_deepthink.plugin.protocol import AdapterNameError, check_adapter_name

ADAPTER_FLAG = "--deepthink-adapter"
ADAPTER_DIR_FLAG = "--deepthink-adapter-dir"
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING"

def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); the argparse `type` of --deepthink-adapter."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH (e.g. sst2=adapters_store/sst2), found {spec!r}")
    try:
        check_adapter_name(name)
    except AdapterNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, path


def adapters_in_dir(directory: str | Path) -> dict[str, str]:
    """{subdirectory name: path} for every subdirectory holding an adapter config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(
            f"{ADAPTER_DIR_FLAG} {directory}: no such directory; expected a directory whose "
            f"subdirectories are adapters (each holding {CONFIG_NAME}).")
    found = {}
    for child in sorted(directory.iterdir()):
        if child.is_dir() and (child / CONFIG_NAME).is_file():
            found[check_adapter_name(child.name)] = str(child)
    if not found:
        raise AdapterFormatError(
            f"{ADAPTER_DIR_FLAG} {directory}: found no adapter; expected subdirectories "
            f"holding {CONFIG_NAME} (built by `vllm-deepthink build --out {directory}/NAME`).")
    return found


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --deepthink-adapter and --deepthink-adapter-dir to a vLLM engine parser."""
    group = parser.add_argument_group(
        title="Deep-Thinking adapters (vllm-deepthink)",
        description="Serve Deep-Thinking KV adapters; a request picks one by its name "
                    "as the OpenAI `model`.")
    group.add_argument(
        ADAPTER_FLAG, dest="deepthink_adapter", action="append", default=None,
        type=parse_adapter_spec, metavar="NAME=PATH",
        help="Serve the adapter directory PATH under the model name NAME. Repeatable.")
    group.add_argument(
        ADAPTER_DIR_FLAG, dest="deepthink_adapter_dir", action="append", default=None,
        metavar="DIR",
        help="Serve every adapter found in DIR, each named by its subdirectory. Repeatable.")
    return parser


def adapters_from_args(args: argparse.Namespace) -> dict[str, str]:
    """{name: path} of the adapter flags in args (empty when none were given)."""
    adapters: dict[str, str] = {}

    def add(name: str, path: str, origin: str) -> None:
        if name in adapters:
            raise AdapterNameError(
                f"Deep-Thinking adapter name {name!r} is given twice ({adapters[name]} and "
                f"{path} from {origin}); names must be unique.")
        adapters[name] = path

    for name, path in getattr(args, "deepthink_adapter", None) or []:
        add(name, path, ADAPTER_FLAG)
    for directory in getattr(args, "deepthink_adapter_dir", None) or []:
        for name, path in adapters_in_dir(directory).items():
            add(name, path, f"{ADAPTER_DIR_FLAG} {directory}")
    return adapters


def runtime_updating_allowed() -> bool:
    """VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING, read like VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    return os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true")


def check_adapters_at_start(model: str, adapters: dict[str, str],
                            revision: str | None = None) -> None:
    """Validate every engine-start adapter against the served model before the engine
    starts; raise one error naming each bad adapter and its reason (the server then
    refuses to start instead of serving without them)."""
    registry = AdapterRegistry(model, revision=revision)
    problems = []
    for name, path in adapters.items():
        try:
            registry.register(name, path)
        except (AdapterFormatError, AdapterRequestError, OSError) as exc:
            problems.append(f"  - {name} ({path}): {exc}")
    if problems:
        raise AdapterFormatError(
            f"cannot serve {len(problems)} of {len(adapters)} Deep-Thinking adapters:\n"
            + "\n".join(problems)
            + f"\nFix or rebuild them, or leave them out of {ADAPTER_FLAG} / "
              f"{ADAPTER_DIR_FLAG}, and start the server again.")


def check_names_are_free(adapters: dict[str, str], args: argparse.Namespace) -> None:
    """An adapter may not take the name of a served model or of a --lora-modules entry
    (the OpenAI `model` field must name one thing)."""
    served = getattr(args, "served_model_name", None) or [getattr(args, "model", None)]
    served = [served] if isinstance(served, str) else list(served)
    loras = [lora.name for lora in getattr(args, "lora_modules", None) or []]
    for name in adapters:
        if name in served or name in loras:
            kind = "served model" if name in served else "LoRA module"
            raise AdapterNameError(
                f"Deep-Thinking adapter name {name!r} is already the name of a {kind}; "
                f"give the adapter another name ({ADAPTER_FLAG} OTHER=PATH).")


def apply_adapter_args(engine_args: Any, args: argparse.Namespace) -> Any:
    """Engine args of `vllm serve` with the adapter flags applied (unchanged without
    them): the DeepThink connector with the adapters in its extra config, exactly as
    api.engine_args builds it. Runtime updating alone also sets the connector up, with
    no adapter. Raises on bad adapters, so the server refuses to start."""
    adapters = adapters_from_args(args)
    runtime = runtime_updating_allowed()
    if not adapters and not runtime:
        return engine_args
    if runtime and (getattr(args, "api_server_count", None) or 0) > 1:
        raise ValueError(
            f"{RUNTIME_UPDATING_ENV} cannot be used with api_server_count > 1: each API "
            f"server process has its own adapter registry. Use one API server.")
    check_names_are_free(adapters, args)
    check_adapters_at_start(engine_args.model, adapters, revision=engine_args.revision)
    overrides = {"kv_transfer_config": engine_args.kv_transfer_config}
    if engine_args.enable_prefix_caching is not None:  # given on the command line
        overrides["enable_prefix_caching"] = engine_args.enable_prefix_caching
    for key, value in api.engine_args(adapters, **overrides).items():
        setattr(engine_args, key, value)
    return engine_args


