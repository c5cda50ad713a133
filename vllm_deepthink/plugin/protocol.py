"""The request protocol between the plugin's frontend, scheduler and workers.

The frontend (`frontend.py`) turns a request for adapter NAME into a plain vLLM
request; everything after it reads only what is defined here:

    SamplingParams.extra_args[ADAPTER_ARG] = NAME      (offline API; the frontend's input)
    kv_transfer_params[PARAMS_KEY] = {name, path, digest, prefix_len}   (set by the frontend)
    cache_salt = "deepthink:<name>:<digest>[:<user salt>]"               (SALT_PREFIX)

Nothing here imports vLLM.
"""

from __future__ import annotations

import re
from typing import Any

# SamplingParams.extra_args key naming the adapter of a request (offline API).
ADAPTER_ARG = "deepthink_adapter"
# SamplingParams.extra_args key of a plain prompt-logprob request that only needs the
# rows scoring prompt positions >= this one: earlier positions may come from the
# prefix cache (patches.engine.local_hit_cap). Used by the vLLM scorer.
SCORED_FROM_ARG = "deepthink_scored_from"
# Key of our entry inside kv_transfer_params.
PARAMS_KEY = "deepthink"
SALT_PREFIX = "deepthink"
CONNECTOR_NAME = "DeepThinkConnector"
CONNECTOR_MODULE = "vllm_deepthink.plugin.connector.connector"
# kv_connector_extra_config keys (the engine's configuration of the plugin):
EXTRA_CONFIG_ADAPTERS = "adapters"              # {name: path} served from start
EXTRA_CONFIG_PARENTS = "adapter_parents"        # {name: base model name} for /v1/models
EXTRA_CONFIG_ADAPTER_DIRS = "adapter_dirs"      # [dir]: unknown names resolve to dir/name
EXTRA_CONFIG_RESIDENT_GIB = "resident_gib"      # worker memory for resident adapters
DEFAULT_RESIDENT_GIB = 4.0

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNameError(ValueError):
    """An adapter name that cannot be served (it looks like a path, or is empty)."""


def check_adapter_name(name: Any) -> str:
    """Return name if it can name an adapter (an OpenAI model name), else raise.

    Names are plain identifiers: letters, digits, '.', '_' and '-', starting with a
    letter or digit, at most 128 characters, never '..'. A name is never a path.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterNameError(
            f"invalid Deep-Thinking adapter name {name!r}: expected letters, digits, '.', "
            f"'_' or '-' (starting with a letter or digit, at most 128 characters, no '..'); "
            f"a name is never a path. Give the path separately, e.g. "
            f"--deepthink-adapter sst2=adapters_store/sst2.")
    return name


def uses_deepthink_connector(vllm_config: Any) -> bool:
    """Whether an engine configured by `vllm_config` (a VllmConfig) runs our connector."""
    kv_config = getattr(vllm_config, "kv_transfer_config", None)
    return kv_config is not None and getattr(kv_config, "kv_connector", None) == CONNECTOR_NAME


def resident_budget_bytes(gib: Any) -> int:
    """Bytes of worker memory for resident adapters, from a number of GiB (None: default)."""
    gib = DEFAULT_RESIDENT_GIB if gib is None else gib
    try:
        value = float(gib)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise ValueError(f"the resident-adapter budget must be a positive number of GiB "
                         f"(--deepthink-resident-gib / engine_args(resident_gib=...)), "
                         f"found {gib!r}")
    return int(value * (1 << 30))


def transfer_entry(kv_transfer_params: Any) -> dict[str, Any] | None:
    """Our entry of a request's kv_transfer_params (a dict or None), or None."""
    if not isinstance(kv_transfer_params, dict):
        return None
    entry = kv_transfer_params.get(PARAMS_KEY)
    return entry if isinstance(entry, dict) else None


def params_transfer_entry(params: Any) -> dict[str, Any] | None:
    """Our entry of the kv_transfer_params a SamplingParams carries, or None."""
    extra = getattr(params, "extra_args", None) or {}
    return transfer_entry(extra.get("kv_transfer_params"))
