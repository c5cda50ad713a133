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


def shared_prefix_cache(past_key_values: Sequence[KV], config, batch_size: int,
                        prefix_len: int | None = None):
    """A `DynamicCache` whose layers hold `past_key_values` expanded to `batch_size`
    WITHOUT a copy (cache_from_kv's DynamicCache constructor concatenates each layer
    into a fresh [batch_size, ...] tensor).

    Safe because transformers' DynamicLayer / DynamicSlidingWindowLayer.update build
    new tensors with torch.cat and only rebind their attributes: a forward never
    writes into the prefix (tests/tasks/test_scoring.py checks this). Relies on those
    layers' attributes (keys, values, is_initialized, cumulative_length): transformers
    5.x internals, pinned by that test.

    Args:
        past_key_values: per layer (key, value), each [1, num_kv_heads, L, head_dim]
            (a sliding-window layer may hold only its last window - 1 positions, as
            the cache of a forward over the prefix does).
        config: the model's HF config (decides each layer's cache kind).
        batch_size: rows of the batch that will use the cache.
        prefix_len: L, the positions the prefix occupies (default: the first layer's
            key length).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(past_key_values):
        raise ValueError(
            f"the model has {len(cache.layers)} cache layers but past_key_values holds "
            f"{len(past_key_values)}; the K/V were computed with another model")
    for i, (layer, (key, value)) in enumerate(zip(cache.layers, past_key_values)):
        if key.dim() != 4 or key.shape != value.shape or key.shape[0] != 1:
            raise ValueError(
                f"past_key_values[{i}]: expected key and value of equal shape "
                f"[1, num_kv_heads, L, head_dim], found {tuple(key.shape)} and "
                f"{tuple(value.shape)}")
        length = past_key_values[0][0].shape[-2] if prefix_len is None else prefix_len
        layer.lazy_initialization(key, value)
        window = getattr(layer, "sliding_window", None)
        stored = key.shape[-2]
        if stored != length and (window is None or stored != min(length, window - 1)):
            raise ValueError(f"past_key_values[{i}] holds {stored} positions, expected "
                             f"{length} (the prefix length)")
        if window is not None and stored > window - 1:
            # What the layer's own update keeps: the last window - 1 positions.
            key, value = key[:, :, -(window - 1):], value[:, :, -(window - 1):]
        layer.keys = key.expand(batch_size, -1, -1, -1)  # [B, kv_heads, L', head_dim] view
        layer.values = value.expand(batch_size, -1, -1, -1)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length
    return cache
