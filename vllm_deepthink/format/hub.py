"""Models and adapters named by a local path or a Hugging Face Hub id (`ORG/NAME`).

A hub id resolves through `huggingface_hub` to a snapshot directory of the local cache,
the way transformers, PEFT and vLLM resolve it: `HF_HOME` / `HF_HUB_CACHE` choose the
cache, `HF_HUB_OFFLINE=1` never touches the network, `revision` picks a branch, tag or
commit. Everything downstream (fingerprints, adapter loading, workers) sees a directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# ORG/NAME as the hub spells repository ids (no path separators beyond the one).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


# What building, importing and fingerprinting read of a model repository: configs,
# tokenizer files and the safetensors weights (never other weight formats, GGUF, ONNX...).
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")


class HubResolutionError(FileNotFoundError):
    """A name that is neither a local directory nor a hub id in reach; says what to do."""


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repository id (and is not a local path)."""
    return bool(_HUB_ID.fullmatch(str(name))) and not Path(name).expanduser().exists()


def resolve_dir(name_or_path: str | Path, *, revision: str | None = None,
                allow_patterns: Sequence[str] | None = None, what: str = "model") -> Path:
    """The local directory of `name_or_path`: itself when it is a directory, else the
    snapshot of the hub repository it names (downloaded unless HF_HUB_OFFLINE is set and
    only `allow_patterns` files, when given).

    Raises HubResolutionError naming both ways of fixing it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if not is_hub_id(str(name_or_path)):
        raise HubResolutionError(
            f"{name_or_path}: no such {what} directory, and not a hub id of the form "
            f"ORG/NAME. Give a local directory or a Hugging Face Hub id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(name_or_path), revision=revision,
                                      allow_patterns=list(allow_patterns)
                                      if allow_patterns else None)).resolve()
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        rev = f" at revision {revision!r}" if revision else ""
        raise HubResolutionError(
            f"{what} {str(name_or_path)!r}{rev} is not a local directory and could not be "
            f"resolved on the Hugging Face Hub ({type(exc).__name__}: {exc}). With "
            f"HF_HUB_OFFLINE=1 it must already be in the hub cache (HF_HOME / "
            f"HF_HUB_CACHE): download it once with `huggingface-cli download "
            f"{name_or_path}`, or pass a local directory.") from None
