"""Adapter resolvers: where an adapter name that is not registered may be found.

Like vLLM's LoRA resolvers (`VLLM_LORA_RESOLVER_CACHE_DIR`), a resolver maps an unknown
model name to an adapter location at request time; the registry then validates the
adapter as any other and serves it from then on (cached: resolved once).

Built in: DirectoryResolver (`--deepthink-adapter-dir DIR`: NAME -> DIR/NAME) and
HubResolver (NAME -> ORG/NAME on the Hugging Face Hub or its local cache). Another source
implements the same one-method interface and is added with `register_resolver`, from a
`vllm.general_plugins` entry point of its own (as vLLM's LoRA resolver plugins register
with LoRAResolverRegistry); every adapter engine started after that consults it after
its directories.

    from vllm_deepthink.plugin.resolvers import HubResolver, register_resolver
    register_resolver("my-org", HubResolver("my-org"))
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Protocol

from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME
from vllm_deepthink.format.hub import resolve_dir
from vllm_deepthink.plugin.protocol import AdapterNameError, check_adapter_name


logger = logging.getLogger(__name__)


class AdapterResolver(Protocol):
    def resolve(self, name: str) -> str | None:
        """The location (directory or hub id) of adapter `name`, or None."""


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

    def names(self) -> list[str]:
        """Every adapter name the directory holds now."""
        found = []
        for child in sorted(self.root.iterdir()):
            if self.resolve(child.name) is not None:
                found.append(child.name)
        return found


class HubResolver:
    """NAME -> ORG/NAME when that hub repository (at `revision`; with HF_HUB_OFFLINE=1 its
    copy in the local hub cache) holds an adapter. Only the adapter's config and weights
    are fetched, and only once the config is found; a name found nowhere is not asked
    again for `retry_after` seconds, so unknown model names do not each cost a hub
    round trip. Returns the resolved snapshot directory (the revision stays pinned)."""

    def __init__(self, org: str, revision: str | None = None, retry_after: float = 300.0):
        if not _is_plain_name(org):
            raise ValueError(f"HubResolver: {org!r} is not a hub organisation name; expected "
                             f"a plain name such as 'my-org'")
        self.org, self.revision, self.retry_after = org, revision, retry_after
        self._missing: dict[str, float] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str) -> str | None:
        if not _is_plain_name(name):
            return None
        with self._lock:
            if time.monotonic() < self._missing.get(name, -math.inf):
                return None
        repo_id = f"{self.org}/{name}"
        try:
            config_dir = resolve_dir(repo_id, revision=self.revision, what="adapter",
                                     allow_patterns=(CONFIG_NAME,))
            if (config_dir / CONFIG_NAME).is_file():
                return str(resolve_dir(repo_id, revision=self.revision, what="adapter",
                                       allow_patterns=(CONFIG_NAME, WEIGHTS_NAME)))
        except Exception as exc:  # noqa: BLE001  the hub client raises many types
            logger.debug("HubResolver: %s not resolved: %s", repo_id, exc)
        with self._lock:
            self._missing[name] = time.monotonic() + self.retry_after
        return None


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
