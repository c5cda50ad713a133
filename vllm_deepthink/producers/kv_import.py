"""What every importer of K/V prefixes shares (PEFT adapters, raw past_key_values).

An importer turns K/V produced elsewhere into a `DeepThinkAdapter` of another
`method`: it checks them against the base model, records where they came from
(`provenance`: source files and their sha256) and stores them as the model's cache
holds them (per layer [num_kv_heads, L, head_dim], K post-RoPE) at positions 0..L-1.
Never imports vLLM; never unpickles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_deepthink.format import (DeepThinkAdapter, DeepThinkConfig, ModelFingerprint,
                                   dtype_name, torch_dtype)
from vllm_deepthink.format.hf_config import kv_geometry, max_positions, text_config
from vllm_deepthink.producers.deepthink.builder import builder_version
from vllm_deepthink.producers.deepthink.iteration import SUPPORTED_MODEL_TYPES


class ImportRefusedError(ValueError):
    """An input that cannot be imported as a KV prefix; the message says what was
    expected, what was found and how to fix it."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_supported(config: Any, source: str) -> None:
    """The base model keeps one plain [kv_heads, L, head_dim] K/V cache per layer (the
    only cache a fixed per-layer prefix can describe)."""
    text = text_config(config)
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise ImportRefusedError(
            f"{source}: base model_type {text.model_type!r} "
            f"({getattr(config, 'architectures', None)}) is not supported; expected one of "
            f"{sorted(SUPPORTED_MODEL_TYPES)}, whose every layer keeps one plain "
            f"[num_kv_heads, L, head_dim] K/V cache.")
    if getattr(text, "num_kv_shared_layers", 0):
        raise ImportRefusedError(
            f"{source}: the base model shares K/V between layers (num_kv_shared_layers="
            f"{text.num_kv_shared_layers}); a per-layer prefix cannot describe it.")


def check_prefix_kv(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], config: Any,
                    source: str, fix: str) -> int:
    """Check per-layer K/V [num_kv_heads, L, head_dim] against the model's cache geometry
    and positions; returns L. `fix` ends every message (how to produce a valid input)."""
    num_layers, num_kv_heads, head_dim = kv_geometry(config)
    if len(keys) != num_layers or len(values) != num_layers:
        raise ImportRefusedError(
            f"{source}: expected K/V for the model's {num_layers} layers, found "
            f"{len(keys)} keys and {len(values)} values. {fix}")
    length = keys[0].shape[1] if keys[0].dim() == 3 else None
    for kind, tensors in (("key", keys), ("value", values)):
        for i, t in enumerate(tensors):
            expected = (num_kv_heads, length, head_dim)
            if t.dim() != 3 or tuple(t.shape) != expected:
                raise ImportRefusedError(
                    f"{source}: layer {i} {kind} has shape {tuple(t.shape)}; expected "
                    f"[num_kv_heads, L, head_dim] = [{num_kv_heads}, {length}, {head_dim}] "
                    f"(the model's KV heads and head dim, one L for every tensor). {fix}")
            if not t.is_floating_point():
                raise ImportRefusedError(
                    f"{source}: layer {i} {kind} has dtype {t.dtype}; expected floating "
                    f"point K/V. {fix}")
            if not torch.isfinite(t).all():
                raise ImportRefusedError(
                    f"{source}: layer {i} {kind} contains NaN or Inf values. {fix}")
    if length < 1:
        raise ImportRefusedError(f"{source}: the prefix has 0 positions. {fix}")
    positions = max_positions(config)
    if positions is not None and length >= positions:
        raise ImportRefusedError(
            f"{source}: a prefix of {length} positions leaves no room for a query within "
            f"the model's {positions} positions. {fix}")
    return length


def make_adapter(model_name: str, fingerprint: ModelFingerprint, method: str,
                 keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                 prefix_special_ids: Sequence[int], provenance: dict[str, Any],
                 dtype: str | None, build_args: dict[str, Any]) -> DeepThinkAdapter:
    """The adapter of imported K/V (already checked), stored in `dtype` (None: as given)."""
    stored = torch_dtype(dtype) if dtype else keys[0].dtype
    dtype_name(stored)  # refuses dtypes the format does not store
    length = keys[0].shape[1]
    config = DeepThinkConfig(
        base_model_name_or_path=model_name,
        fingerprint=fingerprint,
        prefix_len=length,
        dtype=dtype_name(stored),
        method=method,
        num_virtual_tokens=length - len(prefix_special_ids),
        prefix_special_ids=[int(i) for i in prefix_special_ids],
        provenance=provenance,
        build_args=dict(build_args),
        builder_version=builder_version(),
    )
    config.validate("imported adapter config")
    return DeepThinkAdapter(config=config,
                            keys=[k.detach().to("cpu", stored).contiguous() for k in keys],
                            values=[v.detach().to("cpu", stored).contiguous() for v in values])
