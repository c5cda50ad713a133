"""Adapter registry of the frontend process and the rewrite of adapter requests.

The frontend (the process running `LLM` or the API server's `AsyncLLM`) is the
only place that knows adapter names. It turns a request for adapter `name` into
a plain vLLM request the rest of the engine can serve without a registry:

    prompt token ids    = L placeholder ids (the adapter's demo ids) + query ids
    cache_salt          = "deepthink:<name>:<weights digest>[:<user salt>]"
    kv_transfer_params  = {"deepthink": {name, path, digest, prefix_len}}

The salt keeps adapter blocks apart from every other prompt in the prefix cache;
the digest makes a rebuilt adapter (same name, new weights) a new cache entry.
Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.format import AdapterFormatError, DeepThinkAdapter, ModelFingerprint
from vllm_deepthink.format.adapter import resolve_adapter_dir
from vllm_deepthink.plugin.resolvers import AdapterResolver, DirectoryResolver
from vllm_deepthink.plugin.protocol import (
    ADAPTER_ARG,
    EXTRA_CONFIG_ADAPTER_DIRS,
    EXTRA_CONFIG_ADAPTERS,
    EXTRA_CONFIG_PARENTS,
    PARAMS_KEY,
    SALT_PREFIX,
    AdapterNameError,
    check_adapter_name,
    params_transfer_entry,
    uses_deepthink_connector,
)

logger = logging.getLogger(__name__)


class AdapterRequestError(ValueError):
    """A request for an adapter that cannot be served; the message says why."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the frontend needs to rewrite requests for one registered adapter."""

    name: str
    path: str
    digest: str
    prefix_len: int
    placeholder_ids: tuple[int, ...]
    # The served model name /v1/models reports as the adapter's parent (None: the first).
    parent: str | None = None

    def cache_salt(self, user_salt: str | None = None) -> str:
        salt = f"{SALT_PREFIX}:{self.name}:{self.digest}"
        return f"{salt}:{user_salt}" if user_salt else salt

    def transfer_params(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "digest": self.digest,
                "prefix_len": self.prefix_len}


class AdapterRegistry:
    """Adapters the frontend serves, by name. Thread-safe.

    `register` validates the adapter against the served model's fingerprint
    before it becomes visible; workers then load it lazily by path, verifying the
    weights digest, the first time a request for it arrives.
    """

    def __init__(self, model: str | Path, revision: str | None = None,
                 resolvers: Sequence[AdapterResolver] = ()):
        self._model = str(model)
        self._revision = revision
        self._resolvers = list(resolvers)
        self._fingerprint: ModelFingerprint | None = None
        self._adapters: dict[str, AdapterInfo] = {}
        # Adapters named at engine start that failed validation: name -> reason.
        self._failed: dict[str, str] = {}
        # Resolved locations that failed validation: (location, mtime) -> reason.
        self._refused: dict[tuple[str, float], str] = {}
        self._lock = threading.Lock()
        self._fingerprint_lock = threading.Lock()

    def model_fingerprint(self) -> ModelFingerprint:
        with self._fingerprint_lock:
            if self._fingerprint is None:
                try:
                    self._fingerprint = ModelFingerprint.from_checkpoint(
                        self._model, revision=self._revision)
                except (OSError, ValueError) as exc:
                    raise AdapterRequestError(
                        f"cannot fingerprint the served model {self._model!r} to validate "
                        f"adapters: {exc}. vllm-deepthink needs a safetensors checkpoint, "
                        f"as a local directory or a hub id in the hub cache.") from exc
            return self._fingerprint

    def register(self, name: str, path: str | Path, parent: str | None = None
                 ) -> AdapterInfo:
        """Validate the adapter at `path` (a directory or hub id) against the served
        model and serve it as `name` (replacing an adapter of that name). Raises
        AdapterFormatError."""
        _checked_name(name)
        path = str(resolve_adapter_dir(path))  # workers read it by this local path
        adapter = DeepThinkAdapter.from_pretrained(
            path, expected_fingerprint=self.model_fingerprint())
        info = AdapterInfo(name=name, path=path, digest=adapter.digest,
                           prefix_len=adapter.prefix_len,
                           placeholder_ids=tuple(adapter.config.placeholder_token_ids()),
                           parent=parent)
        with self._lock:
            self._adapters[name] = info
            self._failed.pop(name, None)
        logger.info("vllm-deepthink: serving adapter %r from %s (L=%d, digest %s)",
                    name, path, info.prefix_len, info.digest[:12])
        return info

    def register_at_start(self, adapters: Mapping[str, str],
                          parents: Mapping[str, str] | None = None) -> None:
        """Register the engine-start adapters; one that fails is recorded with its
        reason (requests naming it get that reason) and the others are served."""
        for name, path in adapters.items():
            try:
                self.register(name, path, (parents or {}).get(name))
            except (AdapterFormatError, AdapterRequestError, OSError) as exc:
                with self._lock:
                    self._failed[name] = str(exc)
                logger.error("vllm-deepthink: adapter %r cannot be served: %s", name, exc)

    def unregister(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._adapters.pop(name, None)
            self._failed.pop(name, None)
        if info is None:
            raise AdapterRequestError(
                f"no adapter named {name!r} is registered; registered: {self.names()}")
        return info

    def lookup(self, name: str) -> AdapterInfo | None:
        """The adapter served as `name`; an unregistered name is offered to the
        resolvers (e.g. DIR/NAME of --deepthink-adapter-dir), whose adapter is validated
        and registered. None when nobody has it. A resolved adapter that fails
        validation raises AdapterRequestError with the reason (remembered until its
        files change)."""
        with self._lock:
            info = self._adapters.get(name)
        if info is not None or not self._resolvers:
            return info
        for resolver in self._resolvers:
            location = resolver.resolve(name)
            if location is None:
                continue
            key = (location, _mtime(location))
            if key in self._refused:
                raise AdapterRequestError(self._refused[key])
            try:
                return self.register(name, location)
            except (AdapterFormatError, AdapterRequestError, OSError) as exc:
                reason = f"adapter {name!r} found at {location} cannot be served: {exc}"
                self._refused[key] = reason
                raise AdapterRequestError(reason) from None
        return None

    def get(self, name: str) -> AdapterInfo:
        with self._lock:
            failed = self._failed.get(name)
        if failed is not None:
            raise AdapterRequestError(f"adapter {name!r} failed to load at engine start: {failed}")
        info = self.lookup(name)
        if info is not None:
            return info
        raise AdapterRequestError(
            f"unknown adapter {name!r}; this engine serves {self.names()}. Register it "
            f"with vllm_deepthink.engine_args(adapters={{{name!r}: PATH}}) or load it at "
            f"runtime.")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def failed(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)


def _mtime(location: str) -> float:
    """Latest modification time of an adapter directory's files (0 if unreadable)."""
    try:
        return max(p.stat().st_mtime for p in Path(location).iterdir())
    except (OSError, ValueError):
        return 0.0


_registries: dict[tuple[str, str], AdapterRegistry] = {}
_latest: list[AdapterRegistry] = []
_registries_lock = threading.Lock()


def registry_for(vllm_config: Any) -> AdapterRegistry:
    """The registry of the engine configured by `vllm_config`, built at first use
    from its kv_connector_extra_config (one per engine in this process)."""
    if not uses_deepthink_connector(vllm_config):
        raise AdapterRequestError(
            "this engine was not started for Deep-Thinking adapters; start it with "
            "LLM(model=..., **vllm_deepthink.engine_args(adapters={...})) or "
            "`vllm serve --deepthink-adapter NAME=PATH`.")
    kv_config = vllm_config.kv_transfer_config
    key = (kv_config.engine_id, str(vllm_config.model_config.model))
    with _registries_lock:
        registry = _registries.get(key)
        if registry is None:
            extra = kv_config.kv_connector_extra_config
            registry = AdapterRegistry(
                vllm_config.model_config.model, revision=vllm_config.model_config.revision,
                resolvers=[DirectoryResolver(d)
                           for d in extra.get(EXTRA_CONFIG_ADAPTER_DIRS, [])])
            registry.register_at_start(extra.get(EXTRA_CONFIG_ADAPTERS, {}),
                                       extra.get(EXTRA_CONFIG_PARENTS, {}))
            _registries[key] = registry
            _latest[:] = [registry]
        return registry


def current_registry() -> AdapterRegistry:
    """The registry of the engine most recently started in this process (the one
    engine of `vllm serve`). Raises if no Deep-Thinking engine has started."""
    with _registries_lock:
        if not _latest:
            raise AdapterRequestError(
                "no Deep-Thinking engine has started in this process yet")
        return _latest[0]


def adapter_name(params: Any) -> str | None:
    """The adapter a SamplingParams selects, or None."""
    extra = getattr(params, "extra_args", None) or {}
    if ADAPTER_ARG not in extra:
        return None
    return _checked_name(extra[ADAPTER_ARG])


def _checked_name(name: Any) -> str:
    try:
        return check_adapter_name(name)
    except AdapterNameError as exc:
        raise AdapterRequestError(str(exc)) from None


def query_token_ids(prompt: Any, tokenizer: Any) -> tuple[list[int], str | None, str | None]:
    """(query ids, query text or None, user cache salt or None) of a prompt.

    Text is tokenized WITHOUT special tokens (the adapter is the whole prefix); a
    prompt given as token ids is used as given. `prompt` is a rendered engine
    input (dict with "type") or a raw prompt (str or dict).
    """
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise AdapterRequestError(
            f"adapter requests take a text or token-id prompt, found {type(prompt).__name__}")
    kind = prompt.get("type")
    if kind is not None and kind != "token":
        raise AdapterRequestError(
            f"adapter requests take text or token ids; a {kind!r} prompt (embeddings, "
            f"multimodal or encoder-decoder) cannot follow a Deep-Thinking prefix.")
    if "prompt_embeds" in prompt or "multi_modal_data" in prompt:
        raise AdapterRequestError(
            "adapter requests take text or token ids, not embeddings or multimodal data")
    text = prompt.get("prompt")
    salt = prompt.get("cache_salt")
    ids = prompt.get("prompt_token_ids")
    if ids is None:
        if not isinstance(text, str):
            raise AdapterRequestError("an adapter request needs a text or token-id prompt")
        ids = _encode(tokenizer, text, add_special_tokens=False)
    elif isinstance(text, str) and tokenizer is not None:
        # A rendered text prompt: the renderer tokenized it with its defaults (which
        # may add BOS); tokenize it again without special tokens. Ids that do not
        # come from this text (user token ids, truncation) are kept as given.
        with_special = _encode(tokenizer, text, add_special_tokens=True)
        if list(ids) == with_special:
            ids = _encode(tokenizer, text, add_special_tokens=False)
    elif kind == "token" and tokenizer is not None and list(ids) == _encode(
            tokenizer, "", add_special_tokens=True):
        # The renderer drops the text of an empty prompt and keeps only the
        # special tokens it added (e.g. [BOS]): an empty text query.
        ids = []
    ids = [int(i) for i in ids]
    if not ids:
        raise AdapterRequestError(
            "the query has zero tokens; an adapter request needs at least one query "
            "token after the adapter prefix (the engine must compute one position).")
    return ids, text if isinstance(text, str) else None, salt


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise AdapterRequestError(
            "a text prompt needs the tokenizer (the engine was started with "
            "skip_tokenizer_init); send token ids instead")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def rewrite_request(info: AdapterInfo, prompt: Any, params: Any, tokenizer: Any,
                    max_model_len: int) -> tuple[dict[str, Any], Any]:
    """The (engine input, sampling params) that serve `prompt` with adapter `info`.

    Returns a token engine input of placeholder + query ids with the adapter's
    cache salt, and a clone of `params` carrying kv_transfer_params for the
    scheduler and workers.
    """
    query_ids, text, user_salt = query_token_ids(prompt, tokenizer)
    total = info.prefix_len + len(query_ids)
    if total >= max_model_len:
        raise AdapterRequestError(
            f"adapter {info.name!r} occupies {info.prefix_len} positions and the query "
            f"{len(query_ids)}; together {total} leave no room for output within "
            f"max_model_len={max_model_len}. Shorten the query or raise max_model_len.")
    engine_input: dict[str, Any] = {
        "type": "token",
        "prompt_token_ids": list(info.placeholder_ids) + query_ids,
        "cache_salt": info.cache_salt(user_salt),
    }
    if text is not None:
        engine_input["prompt"] = text
    if isinstance(prompt, dict) and "arrival_time" in prompt:
        engine_input["arrival_time"] = prompt["arrival_time"]
    return engine_input, adapter_sampling_params(params, info)


def adapter_sampling_params(params: Any, info: AdapterInfo) -> Any:
    if getattr(params, "prompt_logprob_token_ids", None) is not None:
        raise AdapterRequestError(
            "prompt_logprob_token_ids is not supported with Deep-Thinking adapters; "
            "use prompt_logprobs")
    params = params.clone()
    extra = dict(params.extra_args or {})
    kv_params = dict(extra.get("kv_transfer_params") or {})
    kv_params[PARAMS_KEY] = info.transfer_params()
    extra["kv_transfer_params"] = kv_params
    params.extra_args = extra
    # The adapter prefix arrives through the prefix-cache path: prompt logprobs
    # must not switch it off (vLLM's default for them). compat.py caps the local
    # hit instead so the query's prompt logprobs are computed.
    params.skip_reading_prefix_cache = False
    return params


def reject_forged_params(params: Any) -> None:
    """A request must not carry our kv_transfer_params entry itself: it names a
    path the workers would load. Only the frontend rewrite sets it."""
    if params_transfer_entry(params) is not None:
        raise AdapterRequestError(
            f"kv_transfer_params[{PARAMS_KEY!r}] is reserved for vllm-deepthink; select "
            f"an adapter with extra_args={{{ADAPTER_ARG!r}: NAME}} instead")
