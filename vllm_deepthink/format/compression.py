"""The compression record of a `compressed` adapter (`DeepThinkConfig.compression`):
what `vllm-deepthink compress` writes and the reader checks."""

from __future__ import annotations

from typing import Any

from vllm_deepthink.format.errors import AdapterFormatError, describe
from vllm_deepthink.format.fingerprint import SHA256_HEX

COMPRESSED = "compressed"
# What every compression record holds.
COMPRESSION_KEYS = ("source_method", "source_digest", "source_prefix_len", "prefix_len",
                    "selection", "queries", "distill")


def check_compression_record(method: str, record: Any, prefix_len: int, source: str) -> None:
    """The compression record: present exactly on method "compressed", with every
    key of COMPRESSION_KEYS and its k equal to prefix_len."""
    if method != COMPRESSED:
        if record is not None:
            raise AdapterFormatError(
                f"{source}: a {method!r} adapter has a compression record; only "
                f"method 'compressed' carries one. Compress the adapter again.")
        return
    if not isinstance(record, dict):
        raise AdapterFormatError(
            f"{source}: method 'compressed' needs a compression record (an object), "
            f"found {describe(record)}. Compress the adapter again.")
    missing = [key for key in COMPRESSION_KEYS if key not in record]
    if missing:
        raise AdapterFormatError(
            f"{source}: the compression record lacks {missing}; expected "
            f"{list(COMPRESSION_KEYS)}. Compress the adapter again.")
    source_len = record["source_prefix_len"]
    if (record["prefix_len"] != prefix_len or type(source_len) is not int
            or source_len <= prefix_len):
        raise AdapterFormatError(
            f"{source}: the compression record says k={record['prefix_len']!r} of "
            f"{source_len!r} source positions; expected k == prefix_len "
            f"({prefix_len}) < the source's. Compress the adapter again.")
    if not (isinstance(record["source_digest"], str)
            and SHA256_HEX.fullmatch(record["source_digest"])):
        raise AdapterFormatError(
            f"{source}: compression.source_digest must be the sha256 of the source "
            f"adapter's weights, found {record['source_digest']!r}.")
