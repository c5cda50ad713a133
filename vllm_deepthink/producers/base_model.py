"""The base model a producer reads: a local directory or a hub id (`ORG/NAME` at a
revision, format.hub), as the directory to load and the name the adapter records."""

from __future__ import annotations

from pathlib import Path

from vllm_deepthink.format.hub import MODEL_FILES, HubResolutionError, resolve_dir


def resolve_model(model: str | Path, revision: str | None = None, *,
                  error: type[Exception] = HubResolutionError) -> tuple[Path, str]:
    """(local directory, base_model_name_or_path to record) of `model`: the absolute
    directory of a local model, else the hub id as given (resolved through the Hugging
    Face cache; HF_HUB_OFFLINE is honoured). Raises `error` with what to do when it is
    neither."""
    try:
        directory = resolve_dir(model, revision=revision, allow_patterns=MODEL_FILES)
    except HubResolutionError as exc:
        raise error(str(exc)) from None
    return directory, str(directory) if Path(model).expanduser().is_dir() else str(model)
