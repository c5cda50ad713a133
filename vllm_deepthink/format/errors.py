"""The one error type of the adapter format, and the JSON-file reader that raises it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be used; the message says why and what to do."""


def read_json(path: Path, fix: str,
              error: Callable[[str], Exception] = AdapterFormatError) -> Any:
    """The parsed content of a JSON file; one that is not valid JSON (or not UTF-8)
    raises `error("PATH: not valid JSON (why)" + fix)`, `fix` saying what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}){fix}") from None
