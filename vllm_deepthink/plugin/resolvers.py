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

from pathlib import Path
from typing import Protocol

from vllm_deepthink.format import CONFIG_NAME, AdapterFormatError
from vllm_deepthink.format.adapter import resolve_adapter_dir
from vllm_deepthink.plugin.protocol import AdapterNameError, check_adapter_name


class AdapterResolver(Protocol):
    def resolve(self, name: str) -> str | None:
        """The location (directory or hub id) of adapter `name`, or None."""


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
        try:
            check_adapter_name(name)
        except AdapterNameError:
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
    """NAME -> ORG/NAME when that hub repository (or its copy in the local hub cache, with
    HF_HUB_OFFLINE=1) holds an adapter config. Only the adapter's files are fetched."""

    def __init__(self, org: str, revision: str | None = None):
        check_adapter_name(org)
        self.org, self.revision = org, revision

    def resolve(self, name: str) -> str | None:
        try:
            check_adapter_name(name)
        except AdapterNameError:
            return None
        repo_id = f"{self.org}/{name}"
        try:
            directory = resolve_adapter_dir(repo_id, self.revision)
        except AdapterFormatError:
            return None
        return repo_id if (directory / CONFIG_NAME).is_file() else None


_registered: dict[str, AdapterResolver] = {}


def register_resolver(name: str, resolver: AdapterResolver) -> None:
    """Add `resolver` (anything with `resolve(name) -> location | None`) for the adapter
    engines started after this call in this process; registering a name again replaces
    its resolver."""
    if not callable(getattr(resolver, "resolve", None)):
        raise TypeError(f"resolver {name!r}: expected an object with a resolve(name) method, "
                        f"found {type(resolver).__name__}")
    _registered[name] = resolver


def registered_resolvers() -> list[AdapterResolver]:
    """The resolvers added with register_resolver, in registration order."""
    return list(_registered.values())
