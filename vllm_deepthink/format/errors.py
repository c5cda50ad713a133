"""The one error type of the adapter format."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be used; the message says why and what to do."""
