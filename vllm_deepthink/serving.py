"""`vllm serve BASE --deepthink-adapter NAME=PATH`: adapters as OpenAI models.

What this module holds (the vLLM functions it plugs into are patched in compat.py):

- the CLI flags (`add_cli_args`) and their conversion to adapter paths
  (`adapters_from_args`), folded into the engine arguments by compat;
- the model-name resolution of the OpenAI server: a request whose `model` is an
  adapter name runs on the base model with `extra_args["deepthink_adapter"]`
  (`adapter_model_request`, `to_engine_request`), and its response carries the
  adapter name as `model`;
- the `/v1/models` cards of the adapters (`model_cards`);
- runtime load/unload (`load_adapter`, `unload_adapter`), used by serving_routes.py.

The adapter registry of the API server process (frontend.py) is the one source of
truth: loading is `register`, unloading is `unregister`; the engine is untouched and
requests already running finish with the adapter they started with.
"""

from __future__ import annotations

import argparse
import os
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

from vllm.lora.request import LoRARequest

from vllm_deepthink.adapter import CONFIG_NAME, AdapterFormatError
from vllm_deepthink.frontend import ADAPTER_ARG

ADAPTER_FLAG = "--deepthink-adapter"
ADAPTER_DIR_FLAG = "--deepthink-adapter-dir"
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNameError(ValueError):
    """An adapter name that cannot be served (it looks like a path, or is empty)."""


def check_adapter_name(name: str) -> str:
    """Return name if it can be an OpenAI model name for an adapter, else raise.

    Names are plain identifiers: letters, digits, '.', '_' and '-', starting with a
    letter or digit, at most 128 characters, never '..'. A name is never a path.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterNameError(
            f"invalid Deep-Thinking adapter name {name!r}: expected letters, digits, '.', "
            f"'_' or '-' (starting with a letter or digit, at most 128 characters, no '..'); "
            f"a name is never a path. Give the path separately, e.g. "
            f"{ADAPTER_FLAG} sst2=adapters_store/sst2.")
    return name


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


def check_adapters_at_start(model: str, adapters: dict[str, str]) -> None:
    """Validate every engine-start adapter against the served model before the engine
    starts; raise one error naming each bad adapter and its reason (the server then
    refuses to start instead of serving without them)."""
    from vllm_deepthink.frontend import AdapterRegistry, AdapterRequestError

    registry = AdapterRegistry(model)
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
    check_adapters_at_start(engine_args.model, adapters)
    from vllm_deepthink import api

    overrides = {"kv_transfer_config": engine_args.kv_transfer_config}
    if engine_args.enable_prefix_caching is not None:  # given on the command line
        overrides["enable_prefix_caching"] = engine_args.enable_prefix_caching
    for key, value in api.engine_args(adapters, **overrides).items():
        setattr(engine_args, key, value)
    return engine_args


# ------------------------------------------------------------ the OpenAI server side

def registry_of(models: Any):
    """The adapter registry of the engine behind an OpenAIServingModels, or None when that
    engine was not started for Deep-Thinking adapters (or there is no engine)."""
    from vllm_deepthink import frontend

    vllm_config = getattr(getattr(models, "engine_client", None), "vllm_config", None)
    if vllm_config is None or not frontend.uses_deepthink_connector(
            vllm_config.kv_transfer_config):
        return None
    return frontend.registry_for(vllm_config)


def _served(registry: Any, model_name: str | None) -> Any:
    """The AdapterInfo served as model_name, or None."""
    if registry is None or not model_name or model_name not in registry.names():
        return None
    from vllm_deepthink.frontend import AdapterRequestError

    try:
        return registry.get(model_name)
    except AdapterRequestError:  # unloaded meanwhile
        return None


def is_adapter_model(models: Any, model_name: str | None) -> bool:
    return _served(registry_of(models), model_name) is not None


class AdapterModelRequest(LoRARequest):
    """Carries an adapter's name from the OpenAI model resolution (`_maybe_get_adapters`)
    to `AsyncLLM.add_request`, which turns it into `extra_args["deepthink_adapter"]` and
    drops it (`to_engine_request`): it never reaches the engine as a LoRA. Being a
    LoRARequest, the serving code reports its name as the response's `model`."""


def name_served_adapters(models: Any, error: Any) -> Any:
    """vLLM's 404 for an unknown `model` lists the base model names; add the adapters."""
    registry = registry_of(models)
    names = registry.names() if registry is not None else []
    if names and getattr(error, "error", None) is not None and error.error.code == 404:
        error.error.message += f" Deep-Thinking adapters: {', '.join(names)}."
    return error


def adapter_model_request(models: Any, model_name: str | None) -> AdapterModelRequest | None:
    """The stand-in LoRARequest for an adapter name, or None when model_name is not one."""
    info = _served(registry_of(models), model_name)
    if info is None:
        return None
    return AdapterModelRequest(lora_name=model_name, lora_int_id=1, lora_path=str(info.path))


def to_engine_request(params: Any, lora_request: Any) -> tuple[Any, Any]:
    """(params, lora_request) as the engine takes them: an adapter stand-in becomes
    `params.extra_args["deepthink_adapter"]` and lora_request None; anything else passes."""
    if not isinstance(lora_request, AdapterModelRequest):
        return params, lora_request
    params.extra_args = {**(params.extra_args or {}), ADAPTER_ARG: lora_request.lora_name}
    return params, None


def model_cards(models: Any) -> list[Any]:
    """/v1/models entries of the registered adapters, shaped like LoRA modules' cards:
    id = adapter name, parent = base model, root = adapter path; max_model_len is what
    is left for the query and the completion after the adapter's prefix."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    registry = registry_of(models)
    if registry is None:
        return []
    base_model_name = models.base_model_paths[0].name
    cards = []
    for name in registry.names():
        info = _served(registry, name)
        if info is not None:
            cards.append(ModelCard(
                id=name, root=info.path, parent=base_model_name,
                max_model_len=models.model_config.max_model_len - info.prefix_len,
                permission=[ModelPermission()]))
    return cards


def _error(message: str, status: HTTPStatus, err_type: str, param: str | None = None):
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status,
                                 param=param)


_update_lock = None


def _lock():
    """One asyncio lock for load/unload (they run on the server's event loop)."""
    import asyncio

    global _update_lock
    if _update_lock is None:
        _update_lock = asyncio.Lock()
    return _update_lock


async def load_adapter(models: Any, name: str, path: str, replace: bool = False):
    """POST /v1/load_deepthink_adapter: serve the adapter at `path` as `name`.

    Returns a success string or an ErrorResponse (400: bad or taken name, adapter
    refused with its reason). `models` is the server's OpenAIServingModels. With
    replace=True an adapter already served as `name` is swapped for the new one: new
    requests use the new weights (their digest salts the prefix cache, so no stale
    block is reused) while running requests finish with the old ones.
    """
    import asyncio

    from vllm_deepthink.frontend import AdapterRequestError

    if not name or not path:
        return _error("Both 'adapter_name' and 'adapter_path' must be provided.",
                      HTTPStatus.BAD_REQUEST, "InvalidUserInput")
    try:
        check_adapter_name(name)
    except AdapterNameError as exc:
        return _error(str(exc), HTTPStatus.BAD_REQUEST, "InvalidUserInput", "adapter_name")
    registry = registry_of(models)
    if registry is None:
        return _error(_NOT_DEEPTHINK, HTTPStatus.BAD_REQUEST, "InvalidUserInput")
    if models.is_base_model(name) or name in models.lora_requests:
        return _error(f"The Deep-Thinking adapter name '{name}' is already the name of a "
                      f"served model or LoRA adapter; choose another name.",
                      HTTPStatus.BAD_REQUEST, "InvalidUserInput", "adapter_name")
    async with _lock():
        if not replace and name in registry.names():
            return _error(f"The Deep-Thinking adapter '{name}' is already loaded. Unload it "
                          f"first, or set 'load_inplace' to true to replace it.",
                          HTTPStatus.BAD_REQUEST, "InvalidUserInput", "adapter_name")
        try:
            # Reading and hashing the weights must not block the event loop.
            await asyncio.to_thread(registry.register, name, path)
        except (AdapterFormatError, AdapterRequestError, OSError) as exc:
            return _error(f"Deep-Thinking adapter '{name}' was refused: {exc}",
                          HTTPStatus.BAD_REQUEST, "BadRequestError", "adapter_path")
    return f"Success: Deep-Thinking adapter '{name}' added successfully."


async def unload_adapter(models: Any, name: str):
    """POST /v1/unload_deepthink_adapter: a success string or an ErrorResponse (404 when
    no adapter has that name). Requests already running finish with the adapter."""
    if not name:
        return _error("'adapter_name' needs to be provided to unload a Deep-Thinking adapter.",
                      HTTPStatus.BAD_REQUEST, "InvalidUserInput")
    registry = registry_of(models)
    async with _lock():
        if registry is None or name not in registry.names():
            return _error(f"The Deep-Thinking adapter '{name}' cannot be found.",
                          HTTPStatus.NOT_FOUND, "NotFoundError", "adapter_name")
        registry.unregister(name)
    return f"Success: Deep-Thinking adapter '{name}' removed successfully."


_NOT_DEEPTHINK = ("This server was not started for Deep-Thinking adapters; start it with "
                  f"{ADAPTER_FLAG} NAME=PATH, {ADAPTER_DIR_FLAG} DIR or "
                  f"{RUNTIME_UPDATING_ENV}=True.")
