"""The OpenAI server side of `vllm serve --deepthink-adapter`: adapters as models.

- model-name resolution: a request whose `model` is an adapter name runs on the base
  model with the adapter (`adapter_model_request`, `to_engine_request`), and its
  response carries the adapter name as `model`;
- the `/v1/models` cards of the adapters (`model_cards`), each saying whether it is
  pinned;
- runtime load/unload (`load_adapter`, `unload_adapter`), used by routes.py;
- the HTTP request checks (`reserved_field_error`): over HTTP a client chooses an
  adapter by `model` only and cannot reach into the plugin's namespace;
- the adapter registry built at server start-up, off the event loop
  (`build_registry_at_start`).

Servers without the DeepThink connector: every function here is a no-op.

The adapter registry of the API server process (plugin/registry.py) is the one
source of truth: loading is `register`, unloading is `unregister`; the engine is
untouched and requests already running finish with the adapter they started with.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from vllm.lora.request import LoRARequest

from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError
from vllm_deepthink.format.hub import HubUnavailable, fetch_hub_files, is_hub_id_shape
from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.registry import registry_for, without_path
from vllm_deepthink.plugin.request_checks import (AdapterLookupUnavailable,
                                                  AdapterRequestError, reserved_client_field)
from vllm_deepthink.plugin.protocol import ADAPTER_ARG, AdapterNameError, check_adapter_name
from vllm_deepthink.plugin.serving.flags import (
    ADAPTER_DIR_FLAG,
    ADAPTER_FLAG,
    RUNTIME_UPDATING_ENV,
)


def registry_of(models: Any):
    """The adapter registry of the engine behind an OpenAIServingModels, or None when that
    engine was not started for Deep-Thinking adapters (or there is no engine)."""
    vllm_config = getattr(getattr(models, "engine_client", None), "vllm_config", None)
    if vllm_config is None or not protocol.uses_deepthink_connector(vllm_config):
        return None
    return registry_for(vllm_config)


def pinned_names(models: Any) -> list[str]:
    """The adapters pinned by the configuration of the engine behind `models`."""
    vllm_config = getattr(getattr(models, "engine_client", None), "vllm_config", None)
    kv_config = getattr(vllm_config, "kv_transfer_config", None)
    return protocol.pinned_names(getattr(kv_config, "kv_connector_extra_config", None))


def _served(registry: Any, model_name: str | None) -> Any:
    """The AdapterInfo served as model_name, or None (also for a folder adapter edited
    since it was registered: resolve_adapter_model registers it again, off the event
    loop)."""
    if registry is None or not model_name:
        return None
    return registry.current(model_name)


def reserved_field_error(models: Any, request: Any):
    """An ErrorResponse (400) for an OpenAI request (completion, chat, responses,
    tokens-in generate...) whose client fields reach into the plugin's namespace: a
    `deepthink_*` key in vllm_xargs (or in the sampling_params.extra_args of a
    token-in request), our kv_transfer_params entry, a `deepthink:` cache salt. None
    when the request is fine, or the server does not run our connector. Checked before
    streaming starts, so a stream gets the 400 as its status."""
    if registry_of(models) is None:
        return None
    xargs = getattr(request, "vllm_xargs", None)
    xargs = dict(xargs) if isinstance(xargs, dict) else {}
    sampling = getattr(request, "sampling_params", None)
    extra = getattr(sampling, "extra_args", None)
    if isinstance(extra, dict):
        xargs.update(extra)
    problem = reserved_client_field(
        xargs, getattr(request, "kv_transfer_params", None),
        getattr(request, "cache_salt", None))
    if problem is None:
        return None
    return _error(str(problem), HTTPStatus.BAD_REQUEST, "BadRequestError", problem.param)


async def build_registry_at_start(models: Any) -> None:
    """Build the adapter registry of the server's engine (fingerprint the model,
    validate and hash every engine-start adapter) in a worker thread, while the server
    starts: never on the event loop of a running server, where it would block health
    checks. Raises ValueError naming each engine-start adapter that cannot be served
    (as vLLM does for --lora-modules), so the server does not start without it."""
    import asyncio

    vllm_config = getattr(getattr(models, "engine_client", None), "vllm_config", None)
    if vllm_config is None or not protocol.uses_deepthink_connector(vllm_config):
        return
    registry = await asyncio.to_thread(registry_for, vllm_config)
    failed = registry.failed()
    if failed:
        raise ValueError(
            f"cannot serve {len(failed)} Deep-Thinking adapters:\n"
            + "\n".join(f"  - {name}: {reason}" for name, reason in failed.items())
            + f"\nFix or rebuild them, or leave them out of {ADAPTER_FLAG} / "
              f"{ADAPTER_DIR_FLAG}, and start the server again.")


def is_adapter_model(models: Any, model_name: str | None) -> bool:
    return _served(registry_of(models), model_name) is not None


async def resolve_adapter_model(models: Any, model_name: str | None):
    """For a `model` that is neither served nor registered: an ErrorResponse (400) when a
    resolver (--deepthink-adapter-dir) finds an adapter that cannot be served (503 when
    it cannot answer now), else None (True when it found and registered one).
    Validation reads and hashes the adapter off the event loop, once per name: the
    other requests for that name await its future without holding a thread."""
    import asyncio

    registry = registry_of(models)
    if registry is None or not model_name:
        return None
    future, owner = registry.claim_lookup(model_name)
    if owner:
        await asyncio.get_running_loop().run_in_executor(
            _lookup_pool(), registry.run_lookup, model_name, future)
    try:
        info = await asyncio.wrap_future(future)
    except AdapterLookupUnavailable as exc:
        return _error(str(exc), HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError",
                      "model")
    except AdapterRequestError as exc:
        return _error(str(exc), HTTPStatus.BAD_REQUEST, "BadRequestError", "model")
    return True if info is not None else None


_lookup_executor = None


def _lookup_pool():
    """The threads that resolve unknown model names: their own few, so a flood of
    unknown names queues here instead of taking the event loop's default executor."""
    global _lookup_executor
    if _lookup_executor is None:
        from concurrent.futures import ThreadPoolExecutor

        from vllm_deepthink.plugin.resolvers import DEFAULT_MAX_LOOKUPS

        _lookup_executor = ThreadPoolExecutor(DEFAULT_MAX_LOOKUPS,
                                              thread_name_prefix="deepthink-lookup")
    return _lookup_executor


def lora_name_error(models: Any, request: Any):
    """An ErrorResponse (400) for /v1/load_lora_adapter naming a Deep-Thinking adapter
    (served, or in an adapter directory): the LoRA would be shadowed by the adapter (the
    OpenAI `model` names one thing). None otherwise."""
    registry = registry_of(models)
    name = getattr(request, "lora_name", None)
    if registry is None or not name or not registry.holds(name):
        return None
    return _error(f"The LoRA adapter name '{name}' is the name of a Deep-Thinking adapter "
                  f"served by this server; choose another name (or unload the Deep-Thinking "
                  f"adapter first).", HTTPStatus.BAD_REQUEST, "InvalidUserInput", "lora_name")


class AdapterModelRequest(LoRARequest):
    """Carries an adapter's name from the OpenAI model resolution (`_maybe_get_adapters`)
    to `AsyncLLM.add_request`, which turns it into `extra_args["deepthink_adapter"]` and
    drops it (`to_engine_request`): it never reaches the engine as a LoRA. Being a
    LoRARequest, the serving code reports its name as the response's `model`."""


def name_served_adapters(models: Any, error: Any) -> Any:
    """vLLM's 404 for an unknown `model` lists the base model names; add the adapters."""
    registry = registry_of(models)
    if registry is not None and registry.names() and \
            getattr(error, "error", None) is not None and error.error.code == 404:
        error.error.message += f" Deep-Thinking adapters: {registry.names_text()}."
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
    id = adapter name, parent = base model, root = NAME@sha256:DIGEST (its weights, never
    a server path); max_model_len is what is left for the query and the completion after
    the adapter's prefix; `pinned` (an extra field, which ModelCard allows) says whether
    the workers keep it resident for the engine's life (--deepthink-pin)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    registry = registry_of(models)
    if registry is None:
        return []
    base_model_name = models.base_model_paths[0].name
    pinned = set(pinned_names(models))
    cards = []
    for info in registry.infos():  # no file I/O: one card per registered adapter
        cards.append(ModelCard(
            id=info.name, root=public_root(info), parent=info.parent or base_model_name,
            max_model_len=models.model_config.max_model_len - info.prefix_len,
            permission=[ModelPermission()], pinned=info.name in pinned))
    return cards


def public_root(info: Any) -> str:
    """What clients see of where an adapter comes from: its name and weights digest."""
    return f"{info.name}@sha256:{info.digest}"


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
    if name in pinned_names(models):
        return _error(protocol.pinned_change_error(name), HTTPStatus.BAD_REQUEST,
                      "InvalidUserInput", "adapter_name")
    async with _lock():
        if not replace and name in registry.names():
            return _error(f"The Deep-Thinking adapter '{name}' is already loaded. Unload it "
                          f"first, or set 'load_inplace' to true to replace it.",
                          HTTPStatus.BAD_REQUEST, "InvalidUserInput", "adapter_name")
        location = None
        try:
            # Reading and hashing the weights must not block the event loop.
            location = await asyncio.to_thread(_local_location, models, path)
            await asyncio.to_thread(registry.register, name, location)
        except HubUnavailable as exc:
            return _error(f"Deep-Thinking adapter '{name}': {exc}; try again later.",
                          HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError",
                          "adapter_path")
        except (AdapterFormatError, AdapterRequestError, OSError, ValueError) as exc:
            message = without_path(str(exc), location if location else path, path)
            return _error(f"Deep-Thinking adapter '{name}' was refused: {message}",
                          HTTPStatus.BAD_REQUEST, "BadRequestError", "adapter_path")
    return f"Success: Deep-Thinking adapter '{name}' added successfully."


async def unload_adapter(models: Any, name: str):
    """POST /v1/unload_deepthink_adapter: a success string or an ErrorResponse (404 when
    no adapter has that name). Requests already running finish with the adapter."""
    if not name:
        return _error("'adapter_name' needs to be provided to unload a Deep-Thinking adapter.",
                      HTTPStatus.BAD_REQUEST, "InvalidUserInput")
    registry = registry_of(models)
    if registry is not None and name in pinned_names(models):
        return _error(protocol.pinned_change_error(name), HTTPStatus.BAD_REQUEST,
                      "InvalidUserInput", "adapter_name")
    async with _lock():
        if registry is None or name not in registry.names():
            return _error(f"The Deep-Thinking adapter '{name}' cannot be found.",
                          HTTPStatus.NOT_FOUND, "NotFoundError", "adapter_name")
        registry.unregister(name)
    return f"Success: Deep-Thinking adapter '{name}' removed successfully."


def _local_location(models: Any, path: str) -> str:
    """The directory a load request's `adapter_path` names. A hub id ORG/NAME is looked
    up on the hub (sizes checked against the workers' resident budget before download),
    never as a directory under the server's working directory: write ./ORG/NAME or an
    absolute path for a directory."""
    if not is_hub_id_shape(path):
        return path
    extra = models.engine_client.vllm_config.kv_transfer_config.kv_connector_extra_config
    found = fetch_hub_files(path, (CONFIG_NAME, WEIGHTS_NAME),
                            max_bytes=protocol.resident_budget_bytes(
                                extra.get(protocol.EXTRA_CONFIG_RESIDENT_GIB)))
    if found is None:
        raise AdapterFormatError(
            f"{path!r} is a hub id (ORG/NAME) and no adapter was found on the hub under that "
            f"name (with HF_HUB_OFFLINE=1: in the server's hub cache); for a directory "
            f"under the server's working directory write './{path}', or give an absolute "
            f"path.")
    return str(found)


_NOT_DEEPTHINK = ("This server was not started for Deep-Thinking adapters; start it with "
                  f"{ADAPTER_FLAG} NAME=PATH, {ADAPTER_DIR_FLAG} DIR or "
                  f"{RUNTIME_UPDATING_ENV}=True.")
