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
    return is_hub_id_shape(name) and not Path(name).expanduser().exists()


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


class HubUnavailable(ConnectionError):
    """The hub could not answer now (rate limit, timeout, connection or server error):
    worth asking again soon, unlike a repository that does not exist."""


class HubFileTooLarge(ValueError):
    """The hub reports files larger than the caller allows: refused before downloading."""


def fetch_hub_files(repo_id: str, files: Sequence[str], *, max_bytes: int,
                    revision: str | None = None, timeout: float | None = None) -> Path | None:
    """The snapshot directory holding `files` of hub repository `repo_id` (never a
    directory under the working directory, whatever `repo_id` looks like), or None when
    the repository, the revision or one of the files does not exist.

    Online, the hub's file sizes (`model_info(files_metadata=True)`) are checked against
    `max_bytes` before anything is downloaded, and the download is pinned to the commit
    those sizes describe. With HF_HUB_OFFLINE=1 the local hub cache answers and the
    cached files' sizes are checked. Raises HubFileTooLarge above `max_bytes`,
    HubUnavailable when the hub cannot answer now (429, 5xx, timeout, connection)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if not is_hub_id_shape(repo_id):
        return None
    offline = bool(constants.HF_HUB_OFFLINE)
    not_found = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError,
                 HFValidationError) + ((LocalEntryNotFoundError,) if offline else ())
    try:
        if not offline:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                      timeout=timeout)
            sizes = {s.rfilename: s.size or 0 for s in (info.siblings or ())}
            if any(name not in sizes for name in files):
                return None
            _check_size(repo_id, sum(sizes[name] for name in files), max_bytes)
            revision = info.sha  # download exactly the commit whose sizes were checked
        snapshot = Path(snapshot_download(repo_id=repo_id, revision=revision,
                                          allow_patterns=list(files)))
    except not_found:
        return None
    except HubFileTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001  the hub client raises many transport types
        raise HubUnavailable(f"hub lookup of {repo_id!r} failed: {type(exc).__name__}: "
                             f"{exc}") from None
    paths = [snapshot / name for name in files]
    if not all(p.is_file() for p in paths):
        return None
    _check_size(repo_id, sum(p.stat().st_size for p in paths), max_bytes)
    return snapshot.resolve()


def is_hub_id_shape(name: str) -> bool:
    """Whether `name` is spelled like a hub repository id ORG/NAME (a relative directory
    of that name may exist too; is_hub_id tells them apart the way transformers does)."""
    return bool(_HUB_ID.fullmatch(str(name)))


def _check_size(repo_id: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise HubFileTooLarge(
            f"hub repository {repo_id!r}: the adapter files are {size} bytes, above the "
            f"limit of {max_bytes} bytes; they were not downloaded. Raise the limit "
            f"(max_bytes) if this adapter is meant to be served.")
