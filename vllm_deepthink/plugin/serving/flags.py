"""`vllm serve` flags: `--deepthink-adapter SPEC...`, `--deepthink-adapter-dir DIR`,
`--deepthink-resident-gib GIB`, `--deepthink-pin NAME...`.

`add_cli_args` adds them to vLLM's engine parser (patches.openai_server) and
`apply_adapter_args` folds them into the engine arguments, exactly as
`api.engine_args(adapters=...)` builds them; bad adapters stop the server at start.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.format import AdapterFormatError
from vllm_deepthink.plugin import api, protocol
from vllm_deepthink.plugin.registry import AdapterRegistry
from vllm_deepthink.plugin.request_checks import AdapterRequestError
from vllm_deepthink.plugin.protocol import (
    DEFAULT_RESIDENT_GIB,
    AdapterNameError,
    check_adapter_name,
)
from vllm_deepthink.plugin.resolvers import DirectoryResolver

ADAPTER_FLAG = "--deepthink-adapter"
ADAPTER_DIR_FLAG = "--deepthink-adapter-dir"
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING"

RESIDENT_GIB_FLAG = "--deepthink-resident-gib"
PIN_FLAG = "--deepthink-pin"
_JSON_KEYS = {"name", "path", "base_model_name", "pin"}


@dataclass(frozen=True)
class AdapterSpec:
    """One --deepthink-adapter value: NAME=PATH or the JSON form of --lora-modules,
    {"name": ..., "path": ..., "base_model_name": ..., "pin": true} (PATH may be a hub
    id; pin keeps it resident, like --deepthink-pin NAME)."""

    name: str
    path: str
    base_model_name: str | None = None
    pin: bool = False


def parse_adapter_spec(spec: str) -> AdapterSpec:
    """'NAME=PATH' or a JSON object -> AdapterSpec; the argparse `type` of the flag."""
    if spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON {spec!r}: {exc}") from None
        unknown = sorted(set(data) - _JSON_KEYS) if isinstance(data, dict) else []
        if not isinstance(data, dict) or unknown or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("path"), str) or not data["path"] \
                or not isinstance(data.get("pin", False), bool):
            raise argparse.ArgumentTypeError(
                f'expected {{"name": NAME, "path": PATH[, "base_model_name": MODEL]'
                f'[, "pin": true|false]}}, found {spec!r}'
                + (f" (unknown keys {unknown})" if unknown else "")
                + (" (pin must be true or false)" if isinstance(data, dict)
                   and not isinstance(data.get("pin", False), bool) else ""))
        name, path, base = data["name"], data["path"], data.get("base_model_name")
        pin = data.get("pin", False)
    else:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise argparse.ArgumentTypeError(
                f"expected NAME=PATH (e.g. sst2=adapters_store/sst2) or a JSON object "
                f'{{"name", "path", "base_model_name", "pin"}}, found {spec!r}')
        base, pin = None, False
    return AdapterSpec(_arg_name(name), path, base, pin)


def _arg_name(name: str) -> str:
    """An adapter name of a flag value, or argparse's error."""
    try:
        return check_adapter_name(name)
    except AdapterNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def adapters_in_dir(directory: str | Path) -> dict[str, str]:
    """{subdirectory name: path} for every subdirectory holding an adapter config."""
    try:
        resolver = DirectoryResolver(directory)
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{ADAPTER_DIR_FLAG}: {exc}") from None
    return {name: resolver.resolve(name) for name in resolver.names()}


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Deep-Thinking flags to a vLLM engine parser (`vllm serve --help`)."""
    group = parser.add_argument_group(
        title="Deep-Thinking adapters (vllm-deepthink)",
        description="Serve Deep-Thinking and other KV-prefix adapters; a request picks one "
                    "by its name as the OpenAI `model`, like --lora-modules.")
    group.add_argument(
        ADAPTER_FLAG, dest="deepthink_adapter", action="extend", nargs="+", default=None,
        type=parse_adapter_spec, metavar="SPEC",
        help="Adapters to serve, as NAME=PATH or as JSON "
             '\'{"name": "sst2", "path": "adapters_store/sst2", "base_model_name": "m"}\' '
             "(base_model_name is the parent /v1/models reports). PATH is a directory or "
             "a hub id (ORG/NAME). Several per flag; the flag repeats.")
    group.add_argument(
        ADAPTER_DIR_FLAG, dest="deepthink_adapter_dir", action="append", default=None,
        metavar="DIR",
        help="Serve every adapter in DIR (each named by its subdirectory), and resolve an "
             "unknown model name NAME to DIR/NAME at request time, so adapters added to DIR "
             "are served without a restart. Repeatable.")
    group.add_argument(
        RESIDENT_GIB_FLAG, dest="deepthink_resident_gib", type=float, default=None,
        metavar="GIB",
        help=f"Worker memory for resident adapters (default {DEFAULT_RESIDENT_GIB:g} GiB), "
             f"counting the transient peak of a read; the least recently used beyond it "
             f"are read from disk again, in the background, when needed. An adapter "
             f"whose read cannot fit it is refused at start.")
    group.add_argument(
        PIN_FLAG, dest="deepthink_pin", action="extend", nargs="+", default=None,
        type=_arg_name, metavar="NAME",
        help=f"Keep these adapters (served from start) resident: every worker reads them "
             f"at start and never evicts them. They count against {RESIDENT_GIB_FLAG}; "
             f"the server refuses to start when they leave no room to read the largest "
             f"other adapter. Same as \"pin\": true in the JSON form of {ADAPTER_FLAG}.")
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

    for spec in getattr(args, "deepthink_adapter", None) or []:
        add(spec.name, spec.path, ADAPTER_FLAG)
    for directory in getattr(args, "deepthink_adapter_dir", None) or []:
        for name, path in adapters_in_dir(directory).items():
            add(name, path, f"{ADAPTER_DIR_FLAG} {directory}")
    return adapters


def pins_from_args(args: argparse.Namespace, adapters: dict[str, str]) -> list[str]:
    """The pinned names of --deepthink-pin and of "pin": true, each an adapter served
    from start (`adapters`, of adapters_from_args)."""
    pins = [spec.name for spec in getattr(args, "deepthink_adapter", None) or [] if spec.pin]
    pins += getattr(args, "deepthink_pin", None) or []
    missing = [name for name in pins if name not in adapters]
    if missing:
        raise AdapterNameError(
            f"{PIN_FLAG}: no adapter named {missing[0]!r} is served from start; pin one "
            f"of {sorted(adapters)} (given with {ADAPTER_FLAG} or {ADAPTER_DIR_FLAG}).")
    return list(dict.fromkeys(pins))


def served_names(args: argparse.Namespace) -> list[str]:
    served = getattr(args, "served_model_name", None) or [getattr(args, "model", None)]
    return [served] if isinstance(served, str) else list(served)


def parents_from_args(args: argparse.Namespace) -> dict[str, str]:
    """{name: base_model_name} of the JSON-form adapters that give one; each must be a
    served model name."""
    served = served_names(args)
    parents = {}
    for spec in getattr(args, "deepthink_adapter", None) or []:
        if spec.base_model_name is None:
            continue
        if spec.base_model_name not in served:
            raise AdapterNameError(
                f"adapter {spec.name!r}: base_model_name {spec.base_model_name!r} is not a "
                f"served model name; expected one of {served} (set --served-model-name, or "
                f"leave base_model_name out).")
        parents[spec.name] = spec.base_model_name
    return parents


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
    served = served_names(args)
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
    adapter_dirs = getattr(args, "deepthink_adapter_dir", None) or []
    resident_gib = getattr(args, "deepthink_resident_gib", None)
    runtime = runtime_updating_allowed()
    if not adapters and not adapter_dirs and not runtime:
        for flag, value in ((RESIDENT_GIB_FLAG, resident_gib),
                            (PIN_FLAG, getattr(args, "deepthink_pin", None))):
            if value is not None:
                raise ValueError(f"{flag} needs adapters to serve ({ADAPTER_FLAG}, "
                                 f"{ADAPTER_DIR_FLAG} or {RUNTIME_UPDATING_ENV}=True)")
        return engine_args
    if runtime and (getattr(args, "api_server_count", None) or 0) > 1:
        raise ValueError(
            f"{RUNTIME_UPDATING_ENV} cannot be used with api_server_count > 1: each API "
            f"server process has its own adapter registry. Use one API server.")
    protocol.check_parallelism(engine_args)
    check_names_are_free(adapters, args)
    parents = parents_from_args(args)
    pins = pins_from_args(args, adapters)
    check_adapters_at_start(engine_args.model, adapters, revision=engine_args.revision)
    # tensor_parallel_size: the budget check counts each rank's share of the KV heads.
    overrides = {"kv_transfer_config": engine_args.kv_transfer_config,
                 "tensor_parallel_size": engine_args.tensor_parallel_size}
    if engine_args.enable_prefix_caching is not None:  # given on the command line
        overrides["enable_prefix_caching"] = engine_args.enable_prefix_caching
    for key, value in api.engine_args(adapters, adapter_dirs=adapter_dirs,
                                      resident_gib=resident_gib, parents=parents,
                                      pin=pins or None,
                                      **overrides).items():
        setattr(engine_args, key, value)
    return engine_args
