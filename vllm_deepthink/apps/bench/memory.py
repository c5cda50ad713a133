"""KV-cache and resident memory per task, and how many tasks' prefixes fit a KV cache.

One helper per fact:
- `kv_bytes_per_token`: K and V bytes of one position over all layers (model config);
- `prefix_blocks`: the blocks a prefix of p positions holds at block size B, how many of
  them the prefix cache can share (full blocks only) and the tail written again into
  every request's own block;
- `tasks_fitting`: the most tasks whose prefixes are resident at once in a KV cache of
  a given size;
- `prefix_positions` / `resident_positions`: what a benchmarked system keeps per task.

`memory_report` puts them together for the report's "memory" section (schema in
report.py). Everything here is arithmetic on the model config: no engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1 << 30
# The block sizes the fit is computed at: vLLM's GPU default and its CPU default.
FIT_BLOCK_SIZES = (16, 128)
# The fixed KV cache the fit is computed for.
FIT_KV_CACHE_BYTES = 2 * GIB
COMPRESSED_PREFIX = "deepthink-k"


def kv_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 4) -> int:
    """K and V bytes of one token over all layers (float32 engines)."""
    from transformers import AutoConfig

    from vllm_deepthink.format.hf_config import kv_geometry

    num_layers, kv_heads, head_dim = kv_geometry(AutoConfig.from_pretrained(model_dir))
    return 2 * num_layers * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class PrefixBlocks:
    positions: int
    block_size: int
    held: int      # blocks the prefix occupies while resident: ceil(p / B)
    shared: int    # full blocks, shareable through the prefix cache: floor(p / B)
    tail: int      # positions of the partial last block, written again per request

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def prefix_blocks(positions: int, block_size: int) -> PrefixBlocks:
    """Blocks of a prefix of `positions` positions at `block_size`. vLLM's prefix cache
    hashes full blocks only, so the tail (positions mod block_size) is recomputed (ICL)
    or loaded again (adapter) into each request's own block."""
    if positions < 0:
        raise ValueError(f"`positions` must be >= 0, found {positions}")
    if block_size < 1:
        raise ValueError(f"`block_size` must be >= 1, found {block_size}")
    return PrefixBlocks(positions=positions, block_size=block_size,
                        held=-(-positions // block_size), shared=positions // block_size,
                        tail=positions % block_size)


def tasks_fitting(cache_bytes: int, positions: int, block_size: int,
                  bytes_per_token: int) -> int | None:
    """The most tasks whose whole prefixes (`positions` each, block-rounded) are resident
    at once in `cache_bytes` of KV cache; None when a task has no prefix (no bound).
    Counts prefixes only: the running requests' own blocks come out of the same cache."""
    held = prefix_blocks(positions, block_size).held
    if held == 0:
        return None
    cache_blocks = cache_bytes // (block_size * bytes_per_token)
    return cache_blocks // held


def compressed_label(adapter_len: int | str) -> str:
    """The system name of deepthink with adapters of `adapter_len` positions ("L": the
    demonstrations' own length)."""
    return f"{COMPRESSED_PREFIX}{adapter_len}"


def base_system(system: str) -> str:
    """The system a label runs as: `deepthink-k<k>` runs as deepthink."""
    return "deepthink" if system.startswith(COMPRESSED_PREFIX) else system


def adapter_len_of(system: str, prefix_len: int) -> int | None:
    """k of a `deepthink-k<k>` / `deepthink-kL` system at prefix length L; None otherwise."""
    if not system.startswith(COMPRESSED_PREFIX):
        return None
    k = system[len(COMPRESSED_PREFIX):]
    return prefix_len if k == "L" else int(k)


def prefix_positions(system: str, prefix_len: int) -> int:
    """KV-cache positions one task's prefix takes in `system` (zero-shot: none)."""
    k = adapter_len_of(system, prefix_len)
    if k is not None:
        return k
    return 0 if system == "zero-shot" else prefix_len


def resident_positions(system: str, prefix_len: int) -> int:
    """Positions of K/V one task keeps in host memory outside the KV cache: an adapter's
    resident copy (deepthink*, hf-reference); none for prompts (ICL sends its L
    demonstration ids with every request) or zero-shot."""
    if system.startswith("deepthink") or system == "hf-reference":
        return prefix_positions(system, prefix_len)
    return 0


def memory_entry(system: str, prefix_len: int, bytes_per_token: int,
                 cache_bytes: int = FIT_KV_CACHE_BYTES,
                 block_sizes: tuple[int, ...] = FIT_BLOCK_SIZES) -> dict[str, Any]:
    """One system's memory figures at one prefix length (definitions: report.py)."""
    positions = prefix_positions(system, prefix_len)
    per_block = []
    for block_size in block_sizes:
        blocks = prefix_blocks(positions, block_size)
        fit = tasks_fitting(cache_bytes, positions, block_size, bytes_per_token)
        per_block.append({
            **blocks.to_dict(),
            "kv_bytes_per_task": blocks.held * block_size * bytes_per_token,
            "tail_bytes_per_request": blocks.tail * bytes_per_token,
            "tasks_fit": fit,
            "tasks_per_gib": None if fit is None else fit * GIB / cache_bytes,
        })
    return {"system": system, "prefix_len": prefix_len, "positions": positions,
            "bytes_per_token": bytes_per_token,
            "kv_bytes_per_task": positions * bytes_per_token,
            "resident_bytes_per_task": resident_positions(system, prefix_len) * bytes_per_token,
            "by_block_size": per_block}


def memory_report(systems: list[str], prefix_lens: list[int], bytes_per_token: int,
                  cache_bytes: int = FIT_KV_CACHE_BYTES,
                  block_sizes: tuple[int, ...] = FIT_BLOCK_SIZES) -> dict[str, Any]:
    """The report's "memory" section: every (prefix length, system) entry, and per entry
    and block size the ratio of its tasks_fit to icl-apc's (when icl-apc is measured)."""
    entries = [memory_entry(s, p, bytes_per_token, cache_bytes, block_sizes)
               for p in sorted(set(prefix_lens)) for s in systems if s != "icl-no-apc"]
    for entry in entries:
        icl = memory_entry("icl-apc", entry["prefix_len"], bytes_per_token, cache_bytes,
                           block_sizes)
        for mine, theirs in zip(entry["by_block_size"], icl["by_block_size"]):
            mine["tasks_fit_vs_icl_apc"] = (None if mine["tasks_fit"] is None
                                            else mine["tasks_fit"] / theirs["tasks_fit"])
    return {"kv_cache_bytes": cache_bytes, "block_sizes": list(block_sizes),
            "bytes_per_token": bytes_per_token, "entries": entries}
