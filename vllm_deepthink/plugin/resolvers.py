"""Adapter resolvers: where an adapter name that is not registered may be found.

Like vLLM's LoRA resolvers (`VLLM_LORA_RESOLVER_CACHE_DIR`), a resolver maps an unknown
model name to an adapter location at request time; the registry then validates the
adapter as any other and serves it from then on (cached: resolved once). Another
source (for example a hub organisation) implements the same one-method interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from vllm_deepthink.format import CONFIG_NAME
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
