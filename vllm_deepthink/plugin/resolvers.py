"""Adapter resolvers: where an adapter name that is not registered may be found.

Like vLLM's LoRA resolvers (`VLLM_LORA_RESOLVER_CACHE_DIR`), a resolver maps an unknown
model name to an adapter location at request time; the registry then validates the
adapter as any other and serves it from then on (cached: resolved once).

Built in: DirectoryResolver (`--deepthink-adapter-dir DIR`: NAME -> DIR/NAME) and
HubResolver (NAME -> ORG/NAME on the Hugging Face Hub or its local cache), a
BoundedResolver: every client can send any model name, so a source that costs a round
trip remembers its answers (size-capped), looks each name up once at a time and runs
few lookups at once. Another source
implements the same one-method interface and is added with `register_resolver`, from a
`vllm.general_plugins` entry point of its own (as vLLM's LoRA resolver plugins register
with LoRAResolverRegistry); every adapter engine started after that consults it after
its directories.

    from vllm_deepthink.plugin.resolvers import HubResolver, register_resolver
    register_resolver("my-org", HubResolver("my-org"))
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME
from vllm_deepthink.format.hub import HubFileTooLarge, HubUnavailable, fetch_hub_files
from vllm_deepthink.plugin.protocol import (AdapterNameError, check_adapter_name,
                                            resident_budget_bytes)


logger = logging.getLogger(__name__)


class AdapterResolver(Protocol):
    def resolve(self, name: str) -> str | None:
        """The location (directory or hub id) of adapter `name`, or None. May raise
        ResolverUnavailable (answer later) or AdapterRefused (found, not served)."""


def _is_plain_name(name: str) -> bool:
    """A name a resolver may look up: protocol.check_adapter_name's rule (no separator,
    no '..'), so that it never reaches outside its directory or organisation."""
    try:
        check_adapter_name(name)
    except AdapterNameError:
        return False
    return True


class DirectoryResolver:
    """NAME -> DIR/NAME when that directory holds an adapter config.

    Names are plain identifiers (protocol.check_adapter_name: no separator, no '..'), and
    the candidate must be a direct child of DIR, so a name never reaches outside it."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"adapter directory {root}: no such directory; expected a directory whose "
                f"subdirectories are adapters (each holding {CONFIG_NAME}).")
        self.root = root.resolve()

    def resolve(self, name: str) -> str | None:
        if not _is_plain_name(name):
            return None
        candidate = self.root / name
        if candidate.parent != self.root or not (candidate / CONFIG_NAME).is_file():
            return None
        return str(candidate)

    def label(self, name: str) -> str:
        """How errors name DIR/NAME without showing the server's path."""
        return f"<adapter-dir>/{name}"

    def names(self) -> list[str]:
        """Every adapter name the directory holds now."""
        found = []
        for child in sorted(self.root.iterdir()):
            if self.resolve(child.name) is not None:
                found.append(child.name)
        return found


class ResolverUnavailable(Exception):
    """A resolver could not answer now (its source is rate-limited, slow or down); the
    registry answers 503 and the name is asked again after a short while."""


class AdapterRefused(Exception):
    """A resolver found the adapter but refuses to fetch it (e.g. too large); the
    registry answers 400 with this message."""


# Bounds of a BoundedResolver (HubResolver's defaults; the docs name them).
DEFAULT_CACHE_SIZE = 4096        # names remembered (found, missing or failed)
DEFAULT_MISSING_TTL = 300.0      # seconds a found or missing answer is remembered
DEFAULT_ERROR_TTL = 10.0         # seconds a failed lookup (429, timeout...) is remembered
DEFAULT_MAX_LOOKUPS = 4          # lookups running at once, over all names


@dataclass(frozen=True)
class _Answer:
    location: str | None = None
    error: Exception | None = None  # ResolverUnavailable or AdapterRefused

    def value(self) -> str | None:
        if self.error is not None:
            raise self.error
        return self.location


class BoundedResolver:
    """A resolver whose lookups (`_lookup(name)`, to override) are bounded: answers are
    remembered in a size-capped cache (found and missing for `missing_ttl` seconds,
    failures for `error_ttl`, much shorter so a rate limit does not hide a real adapter
    for long), one lookup per name runs at a time (concurrent callers wait for its
    answer) and at most `max_lookups` run at once."""

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 missing_ttl: float = DEFAULT_MISSING_TTL,
                 error_ttl: float = DEFAULT_ERROR_TTL,
                 max_lookups: int = DEFAULT_MAX_LOOKUPS):
        if cache_size < 1 or max_lookups < 1 or missing_ttl < 0 or error_ttl < 0:
            raise ValueError(
                f"{type(self).__name__}: cache_size and max_lookups must be >= 1 and the "
                f"ttls >= 0, found cache_size={cache_size}, max_lookups={max_lookups}, "
                f"missing_ttl={missing_ttl}, error_ttl={error_ttl}")
        self.cache_size, self.max_lookups = cache_size, max_lookups
        self.missing_ttl, self.error_ttl = missing_ttl, error_ttl
        self._cache: OrderedDict[str, tuple[float, _Answer]] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_lookups)

    def _lookup(self, name: str) -> str | None:
        """The location of `name` or None; raises ResolverUnavailable / AdapterRefused."""
        raise NotImplementedError

    def resolve(self, name: str) -> str | None:
        if not _is_plain_name(name):
            return None
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and time.monotonic() < cached[0]:
                self._cache.move_to_end(name)
                return cached[1].value()
            future = self._inflight.get(name)
            owner = future is None
            if owner:
                future = self._inflight[name] = Future()
        if not owner:
            return future.result().value()
        answer = _Answer(error=ResolverUnavailable(f"lookup of {name!r} was interrupted"))
        try:
            answer = self._run_lookup(name)
        finally:  # waiters always get an answer, even if this thread is interrupted
            ttl = self.error_ttl if isinstance(answer.error, ResolverUnavailable) \
                else self.missing_ttl
            with self._lock:
                self._cache[name] = (time.monotonic() + ttl, answer)
                self._cache.move_to_end(name)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                del self._inflight[name]
            future.set_result(answer)
        return answer.value()

    def _run_lookup(self, name: str) -> _Answer:
        with self._slots:
            try:
                return _Answer(location=self._lookup(name))
            except (ResolverUnavailable, AdapterRefused) as exc:
                return _Answer(error=exc)
            except Exception as exc:  # noqa: BLE001  a failure, not an answer
                logger.warning("%s: lookup of %r failed: %s", type(self).__name__, name, exc)
                return _Answer(error=ResolverUnavailable(
                    f"lookup of {name!r} failed ({type(exc).__name__})"))

    def cached_names(self) -> int:
        """How many names the cache remembers now (at most cache_size)."""
        with self._lock:
            return len(self._cache)


class HubResolver(BoundedResolver):
    """NAME -> ORG/NAME when that hub repository (at `revision`; with HF_HUB_OFFLINE=1 its
    copy in the local hub cache) holds an adapter. Only the adapter's config and weights
    are fetched, and only after the hub reported their sizes: above `max_bytes` (default
    the workers' default resident budget, DEFAULT_RESIDENT_GIB, which an adapter must fit)
    the adapter is refused without downloading. ORG/NAME always names the hub, never a
    directory under the working directory. Lookups are bounded (BoundedResolver):
    unknown names are remembered for `retry_after` seconds, hub failures (429, timeouts,
    connection errors) for `error_retry_after`. Returns the snapshot directory (the
    revision stays pinned)."""

    def __init__(self, org: str, revision: str | None = None,
                 retry_after: float = DEFAULT_MISSING_TTL, *,
                 error_retry_after: float = DEFAULT_ERROR_TTL, max_bytes: int | None = None,
                 timeout: float = 10.0, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_lookups: int = DEFAULT_MAX_LOOKUPS):
        if not _is_plain_name(org):
            raise ValueError(f"HubResolver: {org!r} is not a hub organisation name; expected "
                             f"a plain name such as 'my-org'")
        super().__init__(cache_size=cache_size, missing_ttl=retry_after,
                         error_ttl=error_retry_after, max_lookups=max_lookups)
        self.org, self.revision, self.timeout = org, revision, timeout
        self.max_bytes = resident_budget_bytes(None) if max_bytes is None else int(max_bytes)

    def label(self, name: str) -> str:
        return f"hub:{self.org}/{name}"

    def _lookup(self, name: str) -> str | None:
        repo_id = f"{self.org}/{name}"
        try:
            found = fetch_hub_files(repo_id, (CONFIG_NAME, WEIGHTS_NAME),
                                    max_bytes=self.max_bytes, revision=self.revision,
                                    timeout=self.timeout)
        except HubUnavailable as exc:
            logger.warning("HubResolver: %s", exc)
            raise ResolverUnavailable(f"the hub did not answer for {repo_id!r}; try again "
                                      f"in {self.error_ttl:g} s") from None
        except HubFileTooLarge as exc:
            raise AdapterRefused(str(exc)) from None
        return None if found is None else str(found)


_registered: dict[str, AdapterResolver] = {}


def register_resolver(name: str, resolver: AdapterResolver) -> None:
    """Add `resolver` (anything with `resolve(name) -> location | None`, safe to call from
    several threads) for the adapter engines of this process whose adapter registry is
    built after this call (at server start, or an LLM's first adapter request);
    registering a name again replaces its resolver. Call it at import time of a
    vllm.general_plugins entry point."""
    if not callable(getattr(resolver, "resolve", None)):
        raise TypeError(f"resolver {name!r}: expected an object with a resolve(name) method, "
                        f"found {type(resolver).__name__}")
    _registered[name] = resolver


def registered_resolvers() -> list[AdapterResolver]:
    """The resolvers added with register_resolver, in registration order."""
    return list(_registered.values())
