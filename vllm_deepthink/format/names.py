"""The one rule for an adapter's name: what `vllm serve` accepts as a model name and
what a store directory (`--deepthink-adapter-dir DIR`, `build --out-dir DIR`) holds as
DIR/NAME. A name is never a path."""

from __future__ import annotations

import re
from typing import Any

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ADAPTER_NAME_RULE = ("letters, digits, '.', '_' or '-' (starting with a letter or digit, at "
                     "most 128 characters, no '..')")


def is_adapter_name(name: Any) -> bool:
    """Whether `name` can name an adapter (ADAPTER_NAME_RULE)."""
    return isinstance(name, str) and bool(_NAME_PATTERN.fullmatch(name)) and ".." not in name
