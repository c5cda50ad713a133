"""Adapter registry of the frontend process and the rewrite of adapter requests.

The frontend (the process running `LLM` or the API server's `AsyncLLM`) is the
only place that knows adapter names. It turns a request for adapter `name` into
a plain vLLM request the rest of the engine can serve without a registry:

    prompt token ids    = L placeholder ids (the adapter's demo ids) + query ids
    cache_salt          = "deepthink:<name>:<weights digest>[:<user salt>]"
    kv_transfer_params  = {"deepthink": {name, path, digest, prefix_len, frontend}}

The salt keeps adapter blocks apart from every other prompt in the prefix cache;
the digest makes a rebuilt adapter (same name, new weights) a new cache entry.

It is also where every request field of the plugin is validated (`check_request`):
the scheduler and workers only read what this module wrote. A client cannot write
our kv_transfer_params entry, an extra_args key of the plugin other than the two
documented ones, a malformed scoring position, or a cache salt in the `deepthink:`
namespace; an adapter and a LoRA never serve one request together. Errors are
AdapterRequestError (UnknownAdapterError for a name nobody serves), which
patches/engine.py raises as vLLM's client errors (HTTP 400 / 404).
Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.format import (AdapterFormatError, DeepThinkAdapter, ModelFingerprint,
                                   load_config)
from vllm_deepthink.format.adapter import check_fingerprint, resolve_adapter_dir
from vllm_deepthink.plugin.connector import kv_layout
from vllm_deepthink.plugin.connector.resident import files_mtime, resident_budget_error
from vllm_deepthink.plugin.resolvers import (AdapterRefused, AdapterResolver,
                                             DirectoryResolver, ResolverUnavailable,
                                             registered_resolvers)
from vllm_deepthink.plugin.protocol import (
    ADAPTER_ARG,
    EXTRA_CONFIG_ADAPTER_DIRS,
    EXTRA_CONFIG_ADAPTERS,
    EXTRA_CONFIG_PARENTS,
    EXTRA_CONFIG_RESIDENT_GIB,
    PARAMS_KEY,
    RESERVED_ARG_PREFIX,
    SALT_NAMESPACE,
    SALT_PREFIX,
    SCORED_FROM_ARG,
    AdapterNameError,
    TransferEntry,
    check_adapter_name,
    has_transfer_entry,
    is_int,
    is_reserved_salt,
    resident_budget_bytes,
    uses_deepthink_connector,
)

logger = logging.getLogger(__name__)

# Marks the kv_transfer_params entries this process's frontend wrote (random per
# process, never sent to a client): the output-side patch acts on those only.
FRONTEND_TOKEN = secrets.token_hex(16)
_FRONTEND_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")


class AdapterRequestError(ValueError):
    """A request for an adapter that cannot be served, or a request field of the
    plugin that is not valid; the message says why. `param` names the request field.
    patches/engine.py raises it to vLLM as a validation error (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapterError(AdapterRequestError):
    """A request names an adapter nobody serves (HTTP 404)."""


class AdapterLookupUnavailable(AdapterRequestError):
    """A resolver could not answer now (its hub is rate-limited or down): HTTP 503 over
    the OpenAI server; the name is asked again after the resolver's short error ttl."""


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
                 resident_budget: int | None = None, tp_size: int = 1):
        self._model = str(model)
        self._revision = revision
        self._dtype = dtype  # a torch.dtype the K/V is written in, or None
        # Bytes of worker memory for resident adapters (None: not checked) and the
        # tensor-parallel size (each rank holds its share of the KV heads).
        self._resident_budget = resident_budget
        self._tp_size = tp_size
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
        _checked_name(name)
        path = str(resolve_adapter_dir(path))  # workers read it by this local path
        fingerprint = self.model_fingerprint()
        if self._resident_budget is not None:  # from the config, before the weights
            config = load_config(path)
            check_fingerprint(config, fingerprint, path)
            too_large = resident_budget_error(name, config, self._resident_budget,
                                              self._tp_size)
            if too_large is not None:
                raise AdapterRequestError(too_large, param="model")
        adapter = DeepThinkAdapter.from_pretrained(path, expected_fingerprint=fingerprint)
        if self._dtype is not None:
            for kind, tensors in (("keys", adapter.keys), ("values", adapter.values)):
                for layer, kv in enumerate(tensors):
                    try:
                        kv_layout.to_cache_dtype(kv, self._dtype,
                                                 f"adapter {name!r} layer {layer} {kind}")
                    except ValueError as exc:
                        raise AdapterFormatError(str(exc)) from None
        info = AdapterInfo(name=name, path=path, digest=adapter.digest,
                           prefix_len=adapter.prefix_len,
                           placeholder_ids=tuple(adapter.config.placeholder_token_ids()),
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
            raise AdapterRequestError(
                f"no adapter named {name!r} is registered; registered: {self.names()}")
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
            f"unknown adapter {name!r}; this engine serves {self.names()}. Register it "
            f"with vllm_deepthink.engine_args(adapters={{{name!r}: PATH}}) or load it at "
            f"runtime.")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

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
            extra = kv_config.kv_connector_extra_config
            registry = AdapterRegistry(
                vllm_config.model_config.model, revision=vllm_config.model_config.revision,
                resolvers=[*(DirectoryResolver(d)
                             for d in extra.get(EXTRA_CONFIG_ADAPTER_DIRS, [])),
                           *registered_resolvers()],
                dtype=getattr(vllm_config.model_config, "dtype", None),
                resident_budget=resident_budget_bytes(extra.get(EXTRA_CONFIG_RESIDENT_GIB)),
                tp_size=vllm_config.parallel_config.tensor_parallel_size)
            registry.register_at_start(extra.get(EXTRA_CONFIG_ADAPTERS, {}),
                                       extra.get(EXTRA_CONFIG_PARENTS, {}))
            _registries[key] = registry
        return registry


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
        raise AdapterRequestError(str(exc), param="model") from None


# ----------------------------------------------------------------- request checks

def reserved_client_field(vllm_xargs: Any, kv_transfer_params: Any, cache_salt: Any
                          ) -> AdapterRequestError | None:
    """The error for an HTTP request whose client-controlled fields reach into the
    plugin's namespace, or None. Over HTTP the adapter is chosen by `model` only:
    every `deepthink_*` key of vllm_xargs is refused, as are our kv_transfer_params
    entry and cache salts in the `deepthink:` namespace."""
    if isinstance(vllm_xargs, dict):
        for key in vllm_xargs:
            if isinstance(key, str) and key.startswith(RESERVED_ARG_PREFIX):
                return AdapterRequestError(
                    f"vllm_xargs key {key!r} is reserved for vllm-deepthink: over HTTP a "
                    f"Deep-Thinking adapter is chosen by `model` (its name, as listed by "
                    f"/v1/models), never by vllm_xargs. Remove {key!r}.", param="vllm_xargs")
    for params in (kv_transfer_params,
                   vllm_xargs.get("kv_transfer_params") if isinstance(vllm_xargs, dict)
                   else None):
        if has_transfer_entry(params):
            return _forged_entry_error()
    if is_reserved_salt(cache_salt):
        return _reserved_salt_error(cache_salt)
    return None


def check_request(prompt: Any, params: Any, lora_request: Any = None) -> str | None:
    """Validate the plugin's fields of a request to an engine that runs the DeepThink
    connector; return the adapter name it selects (None: a plain request).

    Refused (AdapterRequestError): our kv_transfer_params entry (only the rewrite
    writes it), kv_transfer_params that is not an object, a `deepthink_*` extra_args
    key other than ADAPTER_ARG and SCORED_FROM_ARG, a SCORED_FROM_ARG that is not an
    int >= 0, a cache salt in the `deepthink:` namespace, an adapter together with a
    LoRA. This is where client values are parsed, so that scheduler and worker code
    never has to.
    """
    extra = getattr(params, "extra_args", None) or {}
    kv_params = extra.get("kv_transfer_params")
    if kv_params is not None and not isinstance(kv_params, dict):
        raise AdapterRequestError(
            f"kv_transfer_params must be a JSON object, found {type(kv_params).__name__} "
            f"{kv_params!r:.60}", param="kv_transfer_params")
    if has_transfer_entry(kv_params):
        raise _forged_entry_error()
    for key in extra:
        if (isinstance(key, str) and key.startswith(RESERVED_ARG_PREFIX)
                and key not in (ADAPTER_ARG, SCORED_FROM_ARG)):
            raise AdapterRequestError(
                f"unknown vllm-deepthink extra_args key {key!r}; the plugin reads "
                f"{ADAPTER_ARG!r} (offline API: vllm_deepthink.sampling_params(adapter=...)) "
                f"and {SCORED_FROM_ARG!r} (the vLLM scorer) only.", param="extra_args")
    if SCORED_FROM_ARG in extra:
        value = extra[SCORED_FROM_ARG]
        if not (is_int(value) and value >= 0):
            raise AdapterRequestError(
                f"extra_args[{SCORED_FROM_ARG!r}] must be an int >= 0 (the first prompt "
                f"position a scoring request scores), found {value!r:.60}",
                param=SCORED_FROM_ARG)
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if is_reserved_salt(salt):
        raise _reserved_salt_error(salt)
    name = adapter_name(params)
    if name is not None and lora_request is not None:
        raise AdapterRequestError(
            f"a request cannot use a LoRA adapter ({getattr(lora_request, 'lora_name', '?')!r}) "
            f"and the Deep-Thinking adapter {name!r} together: the adapter's K/V were "
            f"computed with the base model's weights. Send it without one of them.",
            param="model")
    return name


def _forged_entry_error() -> AdapterRequestError:
    return AdapterRequestError(
        f"kv_transfer_params[{PARAMS_KEY!r}] is reserved for vllm-deepthink (it names the "
        f"files the workers load); select an adapter by `model` over HTTP or with "
        f"vllm_deepthink.sampling_params(adapter=NAME) offline.", param="kv_transfer_params")


def _reserved_salt_error(salt: str) -> AdapterRequestError:
    return AdapterRequestError(
        f"cache_salt {salt[:40]!r} is in the {SALT_NAMESPACE!r} namespace, which is reserved "
        f"for the prefix-cache blocks of Deep-Thinking adapters; use a salt that does not "
        f"start with {SALT_NAMESPACE!r} (an adapter request's own salt is combined with "
        f"the adapter's).", param="cache_salt")


def wrote(entry: TransferEntry | None) -> bool:
    """Whether this process's frontend wrote `entry` (so the engine runs our connector).
    The one reader of the entry's `frontend` token: anything but 32 lowercase hex digits
    is not ours (compare_digest raises TypeError on a non-ASCII str)."""
    if entry is None or not isinstance(entry.frontend, str):
        return False
    return bool(_FRONTEND_TOKEN_PATTERN.fullmatch(entry.frontend)) and secrets.compare_digest(
        entry.frontend, FRONTEND_TOKEN)


def connector_configured() -> bool:
    """Whether an engine of this process runs our connector and has an adapter registry
    (built before the frontend writes any entry): output-side patches are inert
    otherwise."""
    with _registries_lock:
        return bool(_registries)


# ----------------------------------------------------------------- the rewrite

def query_token_ids(prompt: Any, tokenizer: Any) -> tuple[list[int], str | None, str | None]:
    """(query ids, query text or None, user cache salt or None) of a prompt.

    Text is tokenized WITHOUT special tokens (the adapter is the whole prefix); a
    prompt given as token ids is used as given. `prompt` is a rendered engine
    input (dict with "type") or a raw prompt (str or dict). A rendered text prompt
    whose ids start with the text's own tokenization (which may add BOS) gets that
    start replaced by the text tokenized without special tokens; the ids after it
    are kept (beam search re-submits the rendered ids plus the grown ones).
    """
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise AdapterRequestError(
            f"adapter requests take a text or token-id prompt, found {type(prompt).__name__}",
            param="prompt")
    kind = prompt.get("type")
    if kind is not None and kind != "token":
        raise AdapterRequestError(
            f"adapter requests take text or token ids; a {kind!r} prompt (embeddings, "
            f"multimodal or encoder-decoder) cannot follow a Deep-Thinking prefix.",
            param="prompt")
    if "prompt_embeds" in prompt or "multi_modal_data" in prompt:
        raise AdapterRequestError(
            "adapter requests take text or token ids, not embeddings or multimodal data",
            param="prompt")
    text = prompt.get("prompt")
    salt = prompt.get("cache_salt")
    ids = prompt.get("prompt_token_ids")
    if ids is None:
        if not isinstance(text, str):
            raise AdapterRequestError("an adapter request needs a text or token-id prompt",
                                      param="prompt")
        ids = _encode(tokenizer, text, add_special_tokens=False)
    elif isinstance(text, str) and tokenizer is not None:
        # A rendered text prompt: the renderer tokenized it with its defaults (which
        # may add BOS). Ids that do not start with that tokenization (user token ids,
        # truncation) are kept as given.
        ids = list(ids)
        with_special = _encode(tokenizer, text, add_special_tokens=True)
        if ids[:len(with_special)] == with_special:
            ids = _encode(tokenizer, text, add_special_tokens=False) + ids[len(with_special):]
    elif kind == "token" and tokenizer is not None and list(ids) == _encode(
            tokenizer, "", add_special_tokens=True):
        # The renderer drops the text of an empty prompt and keeps only the special
        # tokens it added (e.g. [BOS]): an empty text query.
        ids = []
    ids = [int(i) for i in ids]
    if not ids:
        raise AdapterRequestError(
            "the query has zero tokens; an adapter request needs at least one query "
            "token after the adapter prefix (the engine must compute one position).",
            param="prompt")
    return ids, text if isinstance(text, str) else None, salt


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise AdapterRequestError(
            "a text prompt needs the tokenizer (the engine was started with "
            "skip_tokenizer_init); send token ids instead", param="prompt")
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
            f"max_model_len={max_model_len}. Shorten the query or raise max_model_len.",
            param="prompt")
    engine_input: dict[str, Any] = {
        "type": "token",
        # int(): the engine core decodes list[int] (a float or bool kills its input thread).
        "prompt_token_ids": [int(i) for i in info.placeholder_ids] + query_ids,
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
            "use prompt_logprobs", param="prompt_logprob_token_ids")
    params = params.clone()
    extra = dict(params.extra_args or {})
    kv_params = dict(extra.get("kv_transfer_params") or {})
    kv_params[PARAMS_KEY] = info.transfer_params()
    extra["kv_transfer_params"] = kv_params
    params.extra_args = extra
    # The adapter prefix arrives through the prefix-cache path: prompt logprobs
    # must not switch it off (vLLM's default for them). patches/engine.py caps the local
    # hit instead so the query's prompt logprobs are computed.
    params.skip_reading_prefix_cache = False
    return params
