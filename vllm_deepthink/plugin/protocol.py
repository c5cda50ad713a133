"""The request protocol between the plugin's frontend, scheduler and workers.

The frontend (`rewrite.py`) turns a request for adapter NAME into a plain vLLM
request; everything after it reads only what is defined here:

    SamplingParams.extra_args[ADAPTER_ARG] = NAME      (offline API; the frontend's input)
    kv_transfer_params[PARAMS_KEY] = {name, path, digest, prefix_len, frontend}
                                                       (written by the frontend only)
    cache_salt = "deepthink:<name>:<digest>[:<user salt>]"               (SALT_NAMESPACE)

Everything a client controls is validated in the frontend process; what the scheduler
and workers read of it goes through the readers here (`transfer_entry`, `scored_from`),
which never raise: a malformed value reads as absent. Nothing here imports vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vllm_deepthink.format.names import ADAPTER_NAME_RULE, is_adapter_name

# SamplingParams.extra_args key naming the adapter of a request (offline API).
ADAPTER_ARG = "deepthink_adapter"
# SamplingParams.extra_args key of a plain prompt-logprob request that only needs the
# rows scoring prompt positions >= this one: earlier positions may come from the
# prefix cache (patches.engine.local_hit_cap). Used by the vLLM scorer.
SCORED_FROM_ARG = "deepthink_scored_from"
# Every extra_args key of the plugin starts with this; over HTTP (vllm_xargs) they are
# reserved: a client selects an adapter by `model` only.
RESERVED_ARG_PREFIX = "deepthink_"
# Key of our entry inside kv_transfer_params.
PARAMS_KEY = "deepthink"
SALT_PREFIX = "deepthink"
# Cache salts in this namespace are the frontend's alone (an adapter's prefix-cache
# blocks); a client salt in it is refused, so no plain prompt can write adapter blocks.
SALT_NAMESPACE = SALT_PREFIX + ":"
CONNECTOR_NAME = "DeepThinkConnector"
CONNECTOR_MODULE = "vllm_deepthink.plugin.connector.connector"
# kv_connector_extra_config keys (the engine's configuration of the plugin):
EXTRA_CONFIG_ADAPTERS = "adapters"              # {name: path} served from start
EXTRA_CONFIG_PARENTS = "adapter_parents"        # {name: base model name} for /v1/models
EXTRA_CONFIG_ADAPTER_DIRS = "adapter_dirs"      # [dir]: unknown names resolve to dir/name
EXTRA_CONFIG_RESIDENT_GIB = "resident_gib"      # worker memory for resident adapters
EXTRA_CONFIG_PINNED = "pinned"                  # [name]: resident for the engine's life
DEFAULT_RESIDENT_GIB = 4.0

_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")


class AdapterNameError(ValueError):
    """An adapter name that cannot be served (it looks like a path, or is empty)."""


def check_adapter_name(name: Any) -> str:
    """Return name if it can name an adapter (an OpenAI model name), else raise.

    Names are plain identifiers (format.names.ADAPTER_NAME_RULE). A name is never a path.
    """
    if not is_adapter_name(name):
        raise AdapterNameError(
            f"invalid Deep-Thinking adapter name {name!r}: expected {ADAPTER_NAME_RULE}; "
            f"a name is never a path. Give the path separately, e.g. "
            f"--deepthink-adapter sst2=adapters_store/sst2.")
    return name


def uses_deepthink_connector(vllm_config: Any) -> bool:
    """Whether an engine configured by `vllm_config` (a VllmConfig) runs our connector."""
    kv_config = getattr(vllm_config, "kv_transfer_config", None)
    return kv_config is not None and getattr(kv_config, "kv_connector", None) == CONNECTOR_NAME


# Parallelism the connector cannot serve: (engine argument, what it is, why).
UNSUPPORTED_PARALLELISM = (
    ("pipeline_parallel_size", "pipeline parallel",
     "each stage holds only some layers, and the adapter is written per layer by every "
     "worker"),
    ("decode_context_parallel_size", "decode context parallel",
     "the KV cache of one request is spread over ranks, so the adapter's slots differ"),
    ("prefill_context_parallel_size", "prefill context parallel",
     "the KV cache of one request is spread over ranks, so the adapter's slots differ"),
)


def check_parallelism(sizes: Any) -> None:
    """Raise ValueError when `sizes` (a ParallelConfig, EngineArgs or a mapping of engine
    arguments) asks for parallelism the connector cannot serve; unset sizes are 1."""
    for field, what, why in UNSUPPORTED_PARALLELISM:
        size = sizes.get(field, 1) if isinstance(sizes, dict) else getattr(sizes, field, 1)
        if size is not None and is_int(size) and size > 1:
            raise ValueError(
                f"vllm-deepthink does not support {what} ({field}={size}): {why}. Serve "
                f"Deep-Thinking adapters with {field}=1 (tensor parallel is supported).")


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


def pinned_names(extra_config: Any) -> list[str]:
    """The adapters pinned by an engine's kv_connector_extra_config (engine_args(pin=...),
    --deepthink-pin): names of engine-start adapters, checked by engine_args."""
    names = extra_config.get(EXTRA_CONFIG_PINNED) if isinstance(extra_config, dict) else None
    return list(names or [])


def pinned_change_error(name: str) -> str:
    """The refusal of unloading or replacing pinned adapter `name` at runtime."""
    return (f"Deep-Thinking adapter {name!r} is pinned (--deepthink-pin / "
            f"engine_args(pin=...)): every worker holds its weights from engine start for "
            f"the engine's life, so it cannot be unloaded or replaced at runtime. Restart "
            f"the engine without pinning it to change it.")


def is_reserved_salt(salt: Any) -> bool:
    """Whether a cache salt lies in the plugin's namespace (refused from clients)."""
    return isinstance(salt, str) and salt.startswith(SALT_NAMESPACE)


def is_int(value: Any) -> bool:
    """A plain int (bool is not a number here)."""
    return type(value) is int


@dataclass(frozen=True)
class TransferEntry:
    """Our kv_transfer_params entry, as the frontend wrote it (validated on read)."""

    name: str
    path: str
    digest: str
    prefix_len: int
    # The writing frontend's token (registry.FRONTEND_TOKEN): outputs are cut back to the query only
    # for entries this process's frontend wrote.
    frontend: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "digest": self.digest,
                "prefix_len": self.prefix_len, "frontend": self.frontend}


def has_transfer_entry(kv_transfer_params: Any) -> bool:
    """Whether kv_transfer_params carries our key at all (valid or not)."""
    return isinstance(kv_transfer_params, dict) and PARAMS_KEY in kv_transfer_params


def transfer_entry(kv_transfer_params: Any) -> TransferEntry | None:
    """Our entry of a request's kv_transfer_params, or None when it has none or a
    malformed one. Never raises: scheduler code calls it."""
    if not isinstance(kv_transfer_params, dict):
        return None
    entry = kv_transfer_params.get(PARAMS_KEY)
    if not isinstance(entry, dict):
        return None
    name, path, digest = entry.get("name"), entry.get("path"), entry.get("digest")
    prefix_len, token = entry.get("prefix_len"), entry.get("frontend", "")
    if not (is_adapter_name(name)
            and isinstance(path, str) and path and isinstance(digest, str)
            and _DIGEST_PATTERN.fullmatch(digest) and is_int(prefix_len) and prefix_len > 0
            and isinstance(token, str)):
        return None
    return TransferEntry(name, path, digest, prefix_len, token)


def params_transfer_entry(params: Any) -> TransferEntry | None:
    """Our entry of the kv_transfer_params a SamplingParams carries, or None."""
    extra = getattr(params, "extra_args", None)
    return transfer_entry(extra.get("kv_transfer_params")) if isinstance(extra, dict) else None


def scored_from(params: Any) -> int | None:
    """extra_args[SCORED_FROM_ARG] of a SamplingParams when it is an int >= 0, else None
    (absent or malformed: the frontend refuses malformed ones). Never raises."""
    extra = getattr(params, "extra_args", None)
    value = extra.get(SCORED_FROM_ARG) if isinstance(extra, dict) else None
    return value if is_int(value) and value >= 0 else None
