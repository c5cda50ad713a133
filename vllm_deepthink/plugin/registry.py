"""The adapter registry of the frontend process: adapter names -> validated adapters.

The frontend (the process running `LLM` or the API server's `AsyncLLM`) is the only
place that knows adapter names. `AdapterRegistry` validates an adapter (against the
served model's fingerprint, the workers' resident budget and the engine's dtype) before
it becomes visible, and offers a name it does not hold to the resolvers (resolvers.py),
one lookup per name at a time; `registry_for` builds one registry per engine from its
kv_connector_extra_config. An `AdapterInfo` is what rewrite.py turns a request for a
registered adapter into a plain vLLM request with. Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_deepthink.format import AdapterFormatError, ModelFingerprint
from vllm_deepthink.format.adapter import check_adapter, resolve_adapter_dir
from vllm_deepthink.format.config import check_fingerprint, load_config_and_digest
from vllm_deepthink.plugin.connector import kv_layout
from vllm_deepthink.plugin.connector.resident import files_mtime, resident_budget_error
from vllm_deepthink.plugin.protocol import (
    EXTRA_CONFIG_ADAPTER_DIRS,
    EXTRA_CONFIG_ADAPTERS,
    EXTRA_CONFIG_PARENTS,
    EXTRA_CONFIG_RESIDENT_GIB,
    SALT_PREFIX,
    TransferEntry,
    resident_budget_bytes,
    uses_deepthink_connector,
)
from vllm_deepthink.plugin.request_checks import (AdapterLookupUnavailable,
                                                  AdapterRequestError, UnknownAdapterError,
                                                  checked_name)
from vllm_deepthink.plugin.resolvers import (AdapterRefused, AdapterResolver,
                                             DirectoryResolver, ResolverUnavailable,
                                             registered_resolvers)

logger = logging.getLogger(__name__)

# Marks the kv_transfer_params entries this process's frontend wrote (random per
# process, never sent to a client): the output-side patch acts on those only
# (rewrite.wrote).
FRONTEND_TOKEN = secrets.token_hex(16)


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

    def __post_init__(self) -> None:
        # int(): the engine core decodes prompt_token_ids as list[int] (a float or bool
        # kills its input thread); converted once here, not per request.
        object.__setattr__(self, "placeholder_ids",
                           tuple(int(i) for i in self.placeholder_ids))

    def cache_salt(self, user_salt: str | None = None) -> str:
        salt = f"{SALT_PREFIX}:{self.name}:{self.digest}"
        return f"{salt}:{user_salt}" if user_salt else salt

    def transfer_params(self) -> dict[str, Any]:
        return TransferEntry(self.name, self.path, self.digest, self.prefix_len,
                             FRONTEND_TOKEN).as_dict()


class AdapterRegistry:
    """Adapters the frontend serves, by name. Thread-safe.

    `register` validates the adapter against the served model's fingerprint, and
    (given the workers' resident budget) that a worker can load it, from its config
    before the weights are read (and, given the engine's dtype, that its values fit
    it) before it becomes visible; workers then load it lazily by path, verifying the
    weights digest, the first time a request for it arrives. An adapter a resolver
    found is registered again when its files change (their latest mtime).
    """

    def __init__(self, model: str | Path, revision: str | None = None,
                 resolvers: Sequence[AdapterResolver] = (), dtype: Any = None,
                 resident_budget: int | None = None, tp_size: int = 1,
                 pinned: Mapping[str, int] | None = None):
        self._model = str(model)
        self._revision = revision
        self._dtype = dtype  # a torch.dtype the K/V is written in, or None
        # Bytes of worker memory for resident adapters (None: not checked) and the
        # tensor-parallel size (each rank holds its share of the KV heads).
        self._resident_budget = resident_budget
        self._tp_size = tp_size
        # Pinned adapters {name: resident bytes on a worker}: never evicted, so every
        # other adapter must fit in the room they leave.
        self._pinned = dict(pinned or {})
        self._resolvers = list(resolvers)
        self._fingerprint: ModelFingerprint | None = None
        self._adapters: dict[str, AdapterInfo] = {}
        # Names a resolver found: name -> latest mtime of its files when registered.
        self._resolved_mtime: dict[str, float] = {}
        # Adapters named at engine start that failed validation: name -> reason.
        self._failed: dict[str, str] = {}
        # Resolved locations that failed validation: (location, mtime) -> reason.
        self._refused: dict[tuple[str, float], str] = {}
        # One resolution per name at a time: concurrent first requests share its future.
        self._resolving: dict[str, Future] = {}
        # Names unloaded by `unregister`: not offered to the resolvers again until
        # `register` serves the name anew (an unload sticks).
        self._unloaded: set[str] = set()
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
        AdapterFormatError, or AdapterRequestError for an adapter larger than the
        workers' resident budget."""
        return self._register(name, path, parent)

    def _register(self, name: str, path: str | Path, parent: str | None = None,
                  resolved_mtime: float | None = None) -> AdapterInfo:
        """register; `resolved_mtime`: a resolver found the adapter, whose files had this
        latest mtime before they were read (lookup registers it again when it changes)."""
        checked_name(name)
        path = str(resolve_adapter_dir(path))  # workers read it by this local path
        # Cheapest first: the config, the fingerprint and the budget before the weights,
        # which are read and hashed once per file in this process (check_adapter); the
        # frontend keeps no tensor, only what AdapterInfo holds.
        config, written_digest = load_config_and_digest(path)
        check_fingerprint(config, self.model_fingerprint(), path)
        if self._resident_budget is not None:
            held = sum(b for n, b in self._pinned.items() if n != name)
            too_large = resident_budget_error(name, config, self._resident_budget,
                                              self._tp_size, held)
            if too_large is not None:
                raise AdapterRequestError(too_large, param="model")
        checked = check_adapter(path, config, written_digest)
        # The largest value fits the engine's dtype, so every value does (float32 holds
        # any finite value of an adapter file).
        if self._dtype is not None and self._dtype != torch.float32:
            try:
                kv_layout.to_cache_dtype(torch.tensor([checked.max_abs]), self._dtype,
                                         f"adapter {name!r}")
            except ValueError as exc:
                raise AdapterFormatError(str(exc)) from None
        info = AdapterInfo(name=name, path=path, digest=checked.digest,
                           prefix_len=config.prefix_len,
                           placeholder_ids=tuple(config.placeholder_token_ids()),
                           parent=parent)
        with self._lock:
            self._adapters[name] = info
            self._failed.pop(name, None)
            self._unloaded.discard(name)
            if resolved_mtime is None:
                self._resolved_mtime.pop(name, None)
            else:
                self._resolved_mtime[name] = resolved_mtime
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
                    self._failed[name] = without_path(str(exc), path, f"<path of {name!r}>")
                logger.error("vllm-deepthink: adapter %r cannot be served: %s", name, exc)

    def unregister(self, name: str) -> AdapterInfo:
        """Stop serving `name`; the resolvers are not asked for it again until it is
        registered anew (an adapter directory still holding NAME does not undo it)."""
        with self._lock:
            info = self._adapters.pop(name, None)
            self._failed.pop(name, None)
            self._resolved_mtime.pop(name, None)
            if info is not None:
                self._unloaded.add(name)
        if info is None:
            raise AdapterRequestError(f"no adapter named {name!r} is registered; "
                                      f"registered: {self.names_text(as_list=True)}")
        return info

    def lookup(self, name: str) -> AdapterInfo | None:
        """The adapter served as `name`; an unregistered name is offered to the
        resolvers (e.g. DIR/NAME of --deepthink-adapter-dir), whose adapter is validated
        and registered. None when nobody has it. A resolved adapter that fails
        validation raises AdapterRequestError with the reason (remembered until its
        files change); one whose files changed since it was registered is resolved
        again. Concurrent lookups of one new name validate it once."""
        future, owner = self.claim_lookup(name)
        if owner:
            self.run_lookup(name, future)
        return future.result()

    def claim_lookup(self, name: str) -> tuple[Future, bool]:
        """(future of `name`'s lookup, whether the caller must run it with run_lookup).
        One future per name: the first caller runs the resolution, the others wait on
        it (an async caller awaits it without holding a thread)."""
        self.current(name)  # a resolved adapter edited since is resolved again
        future: Future = Future()
        with self._lock:
            info = self._adapters.get(name)
            if info is not None or not self._resolvers or name in self._unloaded:
                future.set_result(info)
                return future, False
            running = self._resolving.get(name)
            if running is not None:
                return running, False
            self._resolving[name] = future
        return future, True

    def run_lookup(self, name: str, future: Future) -> None:
        """Resolve `name` (claimed with claim_lookup) and settle its future."""
        try:
            result = self._resolve(name)
        except BaseException as exc:  # noqa: BLE001  handed to every waiter
            with self._lock:
                self._resolving.pop(name, None)
            future.set_exception(exc)
        else:
            with self._lock:
                self._resolving.pop(name, None)
            future.set_result(result)

    def current(self, name: str) -> AdapterInfo | None:
        """The adapter registered as `name`, without resolving: None when there is none,
        or when a resolver found it and its files changed since (their latest mtime: a
        stat, no read); that registration is dropped, and the next lookup resolves the
        name again."""
        with self._lock:
            info = self._adapters.get(name)
            registered_mtime = self._resolved_mtime.get(name)
        if info is None or registered_mtime is None:
            return info
        if files_mtime(info.path) == registered_mtime:
            return info
        with self._lock:
            if self._adapters.get(name) is info:
                del self._adapters[name]
                del self._resolved_mtime[name]
        logger.info("vllm-deepthink: adapter %r changed on disk; resolving it again", name)
        return None

    def _resolve(self, name: str) -> AdapterInfo | None:
        unavailable = None
        for resolver in self._resolvers:
            label = _label(resolver, name)
            try:
                location = resolver.resolve(name)
            except ResolverUnavailable as exc:
                unavailable = exc
                continue
            except AdapterRefused as exc:
                raise AdapterRequestError(f"adapter {name!r} found at {label} cannot be "
                                          f"served: {exc}", param="model") from None
            if location is None:
                continue
            mtime = files_mtime(location)  # before the files are read
            key = (location, mtime)
            refused = self._refused.get(key)
            if refused is not None:
                raise AdapterRequestError(refused, param="model")
            try:
                return self._register(name, location, resolved_mtime=mtime)
            except (AdapterFormatError, AdapterRequestError, OSError) as exc:
                reason = (f"adapter {name!r} found at {label} cannot be served: "
                          f"{without_path(str(exc), location, label)}")
                with self._lock:
                    self._refused[key] = reason
                    while len(self._refused) > _MAX_REFUSED:  # the oldest go first
                        del self._refused[next(iter(self._refused))]
                raise AdapterRequestError(reason, param="model") from None
        if unavailable is not None:
            raise AdapterLookupUnavailable(
                f"adapter {name!r} could not be looked up now: {unavailable}", param="model")
        return None

    def holds(self, name: str) -> bool:
        """Whether `name` is an adapter's: registered, or in an adapter directory (the
        resolvers that answer without a network round trip)."""
        with self._lock:
            if name in self._adapters:
                return True
            if name in self._unloaded:  # unloaded: requests no longer resolve it
                return False
        return any(isinstance(r, DirectoryResolver) and r.resolve(name) is not None
                   for r in self._resolvers)

    def get(self, name: str) -> AdapterInfo:
        with self._lock:
            failed = self._failed.get(name)
        if failed is not None:
            raise AdapterRequestError(
                f"adapter {name!r} failed to load at engine start: {failed}", param="model")
        info = self.lookup(name)
        if info is not None:
            return info
        raise UnknownAdapterError(
            f"unknown adapter {name!r}; this engine serves "
            f"{self.names_text(as_list=True)}. Register it "
            f"with vllm_deepthink.engine_args(adapters={{{name!r}: PATH}}) or load it at "
            f"runtime.")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def infos(self) -> list[AdapterInfo]:
        """The registered adapters by name, as registered: no file is touched (a folder
        adapter edited since is resolved again by the next request naming it)."""
        with self._lock:
            return [self._adapters[name] for name in sorted(self._adapters)]

    def names_text(self, limit: int = 20, as_list: bool = False) -> str:
        """The registered names for a message ("a, b", or "['a', 'b']" `as_list`): the
        first `limit`, then how many more (a server of thousands of adapters does not
        send them all with every 404)."""
        names = self.names()
        shown = str(names[:limit]) if as_list else ", ".join(names[:limit])
        return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"

    def failed(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)


# Refused adapter locations remembered (each a reason string): bounded, since anyone who
# can write to an adapter directory or a hub organisation can add more.
_MAX_REFUSED = 1024


def _label(resolver: Any, name: str) -> str:
    """How errors name where a resolver found `name` (never a server path)."""
    label = getattr(resolver, "label", None)
    return label(name) if callable(label) else f"{type(resolver).__name__}:{name}"


def without_path(message: str, location: str | Path, label: str) -> str:
    """`message` with the server-side path of an adapter replaced by `label`: clients see
    names and digests, never the server's directories."""
    for path in {str(location), str(Path(location).expanduser().resolve())}:
        message = message.replace(path, label)
    return message


_registries: dict[tuple[str, str], AdapterRegistry] = {}
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
            from vllm_deepthink.plugin.connector import pins

            extra = kv_config.kv_connector_extra_config
            try:
                pinned = pins.footprints(vllm_config, pins.pinned_paths(extra))
            except (ValueError, OSError, AdapterFormatError):
                pinned = {}  # the workers refuse such a pinned set at engine start
            registry = AdapterRegistry(
                vllm_config.model_config.model, revision=vllm_config.model_config.revision,
                resolvers=[*(DirectoryResolver(d)
                             for d in extra.get(EXTRA_CONFIG_ADAPTER_DIRS, [])),
                           *registered_resolvers()],
                dtype=getattr(vllm_config.model_config, "dtype", None),
                resident_budget=resident_budget_bytes(extra.get(EXTRA_CONFIG_RESIDENT_GIB)),
                tp_size=vllm_config.parallel_config.tensor_parallel_size,
                pinned={name: f.resident for name, f in pinned.items()})
            registry.register_at_start(extra.get(EXTRA_CONFIG_ADAPTERS, {}),
                                       extra.get(EXTRA_CONFIG_PARENTS, {}))
            _registries[key] = registry
        return registry


def connector_configured() -> bool:
    """Whether an engine of this process runs our connector and has an adapter registry
    (built before the frontend writes any entry): output-side patches are inert
    otherwise."""
    with _registries_lock:
        return bool(_registries)
