"""Per-layer (key, value) tensors <-> transformers cache objects (transformers >= 5).

transformers 5 models only take `Cache` objects as past_key_values. Building the
cache with the model's config gives each layer its own kind (e.g. Gemma 3's
sliding-window layers get a `DynamicSlidingWindowLayer`), so masks are right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KV = tuple[torch.Tensor, torch.Tensor]


def cache_from_kv(past_key_values: Sequence[KV], config, batch_size: int = 1):
    """A `DynamicCache` holding `past_key_values`.

    Args:
        past_key_values: per layer (key, value), each [1 or batch_size, num_kv_heads, L, head_dim].
        config: the model's HF config (decides each layer's cache kind).
        batch_size: rows of the batch that will use the cache; batch-1 tensors are
            expanded (no copy) to it.
    """
    from transformers import DynamicCache

    layers = []
    for i, (key, value) in enumerate(past_key_values):
        if key.dim() != 4 or key.shape != value.shape:
            raise ValueError(
                f"past_key_values[{i}]: expected key and value of equal shape "
                f"[batch, num_kv_heads, L, head_dim], found {tuple(key.shape)} and "
                f"{tuple(value.shape)}")
        if key.shape[0] != batch_size:
            if key.shape[0] != 1:
                raise ValueError(
                    f"past_key_values[{i}] has batch {key.shape[0]}; expected 1 or "
                    f"batch_size={batch_size}")
            key = key.expand(batch_size, -1, -1, -1)
            value = value.expand(batch_size, -1, -1, -1)
        layers.append((key, value))
    cache = DynamicCache(layers, config=config)
    if len(cache.layers) != len(layers):
        raise ValueError(
            f"the model has {len(cache.layers)} cache layers but past_key_values holds "
            f"{len(layers)}; the K/V were computed with another model")
    return cache


def last_positions(cache, length: int) -> list[KV]:
    """Per layer (key, value) of the last `length` cached positions, each
    [batch, num_kv_heads, length, head_dim], as new contiguous tensors (so the
    cache itself can be freed)."""
    out = []
    for layer in cache.layers:
        out.append((layer.keys[:, :, -length:, :].contiguous(),
                    layer.values[:, :, -length:, :].contiguous()))
    return out
