"""The one error type of the adapter format, and the JSON-file reader that raises it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A JSON file of the format (an adapter config, a PEFT adapter_config.json) is small: the
# largest real ones hold a few thousand token ids and a search trace (tens of KiB). The
# cap bounds what a hostile file costs before anything is parsed.
MAX_JSON_BYTES = 16 << 20


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be used; the message says why and what to do."""


def read_json(path: Path, fix: str,
              error: Callable[[str], Exception] = AdapterFormatError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed content of a JSON file of at most `max_bytes` bytes.

    Every way a file can fail to parse (not UTF-8, not JSON, nested deeper than the
    interpreter recurses, an integer beyond Python's digit limit, too large) raises
    `error("PATH: ... (why)" + fix)`, `fix` saying what to do; the size is checked
    before the file is read."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise error(f"{path}: cannot be read ({type(exc).__name__}: {exc}){fix}") from None
    if size > max_bytes or len(data) > max_bytes:  # len: the file grew while being read
        raise error(f"{path}: {max(size, len(data))} bytes, more than the {max_bytes} "
                    f"bytes a JSON file of the format may have{fix}")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply to parse){fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}){fix}") from None
    except ValueError:  # Python's limit on the digits of an integer it converts
        raise error(f"{path}: not valid JSON for this reader (a number has more than "
                    f"{sys.get_int_max_str_digits()} digits){fix}") from None


def describe(value: Any, limit: int = 60) -> str:
    """A short description of a value found in a file, for error messages: its repr cut
    to `limit` characters and its type (an integer too long to print by its digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({type(value).__name__})"
