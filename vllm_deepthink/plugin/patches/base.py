"""The machinery every patch uses: PatchSpec, vLLM's original callable, replace()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_ORIGINAL = "__deepthink_original__"


@dataclass(frozen=True)
class PatchSpec:
    """One patched vLLM callable and the parameters it had when we wrote the patch.
    Classmethod parameters omit cls; an owner may be a module."""

    owner: Any
    attribute: str
    vllm_file: str
    parameters: tuple[str, ...]


def _function(owner: Any, attribute: str) -> Callable:
    current = vars(owner)[attribute]
    return current.__func__ if isinstance(current, (classmethod, staticmethod)) else current


def original(owner: Any, attribute: str) -> Callable:
    """vLLM's own implementation of a (possibly patched) callable."""
    func = _function(owner, attribute)
    return getattr(func, _ORIGINAL, func)


def is_patched(owner: Any, attribute: str) -> bool:
    return hasattr(_function(owner, attribute), _ORIGINAL)


def replace(owner: Any, attribute: str, func: Callable, wrapper: type | None = None) -> None:
    """Install func as owner.attribute, remembering vLLM's own implementation."""
    vllm_func = original(owner, attribute)
    setattr(func, _ORIGINAL, vllm_func)
    func.__doc__ = func.__doc__ or vllm_func.__doc__
    setattr(owner, attribute, wrapper(func) if wrapper is not None else func)
