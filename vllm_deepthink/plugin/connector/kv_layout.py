"""Pure tensor functions that place adapter K/V into vLLM's paged KV cache.

No vLLM imports: everything here is tested on CPU without an engine. The worker
side of the connector (connector.py) strings these together and hands the result
to the attention backend's own `do_kv_cache_update`, which owns the physical
layout of the cache (the CPU backend packs K in an ISA-specific way).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

_INTEGER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Cache slot of every position in [start, end) of one request.

    Args:
        block_ids: the request's block table (block i holds positions
            [i * block_size, (i + 1) * block_size)); must cover position end - 1.
        block_size: tokens per block, as the scheduler counts them. A backend that
            splits blocks into smaller kernel blocks keeps the same slot numbers.
    Returns:
        [end - start] int64: block_ids[p // block_size] * block_size + p % block_size.
    """
    if not 0 <= start < end:
        raise ValueError(f"expected 0 <= start < end, found start={start}, end={end}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, found {block_size}")
    needed = (end - 1) // block_size + 1
    if len(block_ids) < needed:
        raise ValueError(
            f"positions up to {end - 1} need {needed} blocks of {block_size}, but the "
            f"block table has {len(block_ids)}")
    # Every slot of the blocks holding [start, end), then the run of them that is
    # [start, end): few tensor ops, since this runs for every adapter load.
    first = start // block_size
    table = torch.tensor(list(block_ids[first:needed]), dtype=torch.int64)   # [b]
    slots = (table[:, None] * block_size
             + torch.arange(block_size, dtype=torch.int64)).flatten()      # [b * bs]
    offset = start - first * block_size
    return slots[offset:offset + end - start]                              # [n]


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The [first, last) KV heads that tensor-parallel rank `tp_rank` holds.

    Mirrors QKVParallelLinear (vllm/model_executor/layers/linear.py): with
    tp_size <= heads each rank holds heads/tp_size contiguous heads; with
    tp_size > heads each head is replicated on tp_size/heads ranks and rank r
    holds head r // replicas.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ValueError(
                f"{total_kv_heads} KV heads cannot be split evenly over tensor parallel "
                f"size {tp_size}")
        per_rank = total_kv_heads // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    if tp_size % total_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp_size} is not a multiple of the {total_kv_heads} "
            f"KV heads, so they cannot be replicated evenly")
    replicas = tp_size // total_kv_heads
    head = tp_rank // replicas
    return head, head + 1


def rank_heads(kv: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """[total_kv_heads, L, D] -> [rank_kv_heads, L, D], this rank's heads only."""
    first, last = kv_head_range(kv.shape[0], tp_size, tp_rank)
    return kv[first:last]


def to_cache_dtype(kv: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Convert to the dtype the cache write expects; refuse values it cannot hold."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(
            f"{what}: cannot write K/V into a {dtype} cache; vllm-deepthink writes "
            f"float32/float16/bfloat16 K/V. Serve with kv_cache_dtype='auto'.")
    converted = kv.to(dtype)
    if not torch.isfinite(converted).all():
        raise ValueError(
            f"{what}: K/V values overflow {dtype} (largest magnitude "
            f"{kv.abs().max().item():.3g}); serve the model in float32 or bfloat16, or "
            f"rebuild the adapter in this dtype.")
    return converted


def token_major(kv: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[kv_heads, L, D] -> [end - start, kv_heads, D], the layout of the `key` and
    `value` arguments of an attention backend's do_kv_cache_update."""
    if not 0 <= start < end <= kv.shape[1]:
        raise ValueError(
            f"positions [{start}, {end}) are outside the adapter's {kv.shape[1]} positions")
    return kv[:, start:end, :].transpose(0, 1).contiguous()


def layer_index(layer_name: str) -> int:
    """The layer number in an attention layer's module name, e.g.
    "model.layers.3.self_attn.attn" -> 3, "transformer.h.0.attn.attn" -> 0."""
    numbers = _INTEGER.findall(layer_name)
    if len(numbers) != 1:
        raise ValueError(
            f"attention layer name {layer_name!r} should contain exactly one layer "
            f"number, found {numbers}")
    return int(numbers[0])


def match_layers(layer_names: Iterable[str], num_layers: int) -> dict[str, int]:
    """Map the engine's attention layer names to adapter layers 0..num_layers-1.

    Names whose number is >= num_layers belong to a draft model (speculative
    decoding numbers its layers after the target's) and are left out. Every
    adapter layer must match exactly one name.
    """
    matched: dict[str, int] = {}
    by_index: dict[int, list[str]] = {}
    for name in layer_names:
        index = layer_index(name)
        if index < num_layers:
            matched[name] = index
            by_index.setdefault(index, []).append(name)
    duplicates = {i: names for i, names in by_index.items() if len(names) > 1}
    missing = sorted(set(range(num_layers)) - set(by_index))
    if duplicates or missing:
        raise ValueError(
            f"cannot match the engine's attention layers to the adapter's {num_layers} "
            f"layers: missing layer numbers {missing}, ambiguous {duplicates}. The "
            f"adapter was built for another architecture, or this engine layout "
            f"(pipeline parallel, cross-layer KV sharing) is not supported.")
    return matched
