"""Import raw per-layer K/V (`past_key_values`) from a safetensors file.

The input layout, for tools that produce K/V prefixes (e.g. trained KV caches such as
Cartridges, or a saved HF cache):

    one safetensors file; for every layer i in 0..num_layers-1 of the base model:
      layers.{i}.key     [num_kv_heads, L, head_dim]      (or HF's cache layout
      layers.{i}.value   [num_kv_heads, L, head_dim]       [1, num_kv_heads, L, head_dim])

- K and V exactly as the model's attention cache holds them for prefix positions
  0..L-1: for RoPE models K is post-rotary (what `past_key_values` of an HF forward
  over L tokens holds); for learned-position models (GPT-2) the position embedding is
  already inside. The served query starts at position L.
- The query is tokenized without special tokens, so a prefix that should start with
  BOS carries BOS's K/V itself (position 0).
- dtype float32, float16 or bfloat16 (others need `--dtype`); every tensor finite;
  no other tensors. String metadata in the header is kept in the adapter's provenance.
- A vllm-deepthink adapter's own `deepthink_model.safetensors` has this layout.

With a saved HF cache `cache` (transformers >= 5):

    from safetensors.torch import save_file
    save_file({f"layers.{i}.{kind}": getattr(layer, kind + "s")[0].contiguous()
               for i, layer in enumerate(cache.layers) for kind in ("key", "value")},
              "cache.safetensors")

Checked against `--model`: layer count, KV heads, head dim (the fingerprint's), L
within the model's positions, finite values. Never unpickles.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint, dtype_name
from vllm_deepthink.format.hf_config import kv_geometry
from vllm_deepthink.producers.base_model import resolve_model
from vllm_deepthink.producers.kv_import import (ImportRefusedError, check_model_supported,
                                               check_prefix_kv, file_sha256, make_adapter)

METHOD = "past-kv"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_NAME = re.compile(r"layers\.(\d+)\.(key|value)")
_FIX = ("Write one safetensors file with layers.{i}.key / layers.{i}.value of shape "
        "[num_kv_heads, L, head_dim] (or [1, num_kv_heads, L, head_dim]) for every layer "
        "of the base model (see `vllm-deepthink import past-kv --help`).")
_CONVERT = ("Convert it once, in an environment you trust: load it with torch and save "
            "the per-layer tensors with safetensors.torch.save_file({'layers.0.key': ..., "
            "'layers.0.value': ..., ...}, 'cache.safetensors').")


def read_past_kv(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; pickles are refused unopened."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ImportRefusedError(f"{path}: no such file; expected a safetensors file of "
                                 f"per-layer K/V. {_FIX}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ImportRefusedError(
            f"{path}: a {path.suffix} file is a pickle (torch.save); expected a safetensors "
            f"file. Pickles are never loaded here. {_CONVERT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for other files
        raise ImportRefusedError(
            f"{path}: not a readable safetensors file ({exc}); expected per-layer K/V in "
            f"safetensors. If it is a torch.save pickle: {_CONVERT}") from None
    return tensors, metadata


def _per_layer(tensors: dict[str, torch.Tensor], num_layers: int, source: str
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(keys, values, layout): the file's tensors by layer, [num_kv_heads, L, head_dim]."""
    found_layers = sorted({int(m.group(1)) for name in tensors if (m := _NAME.fullmatch(name))})
    unexpected = sorted(name for name in tensors if not _NAME.fullmatch(name))
    expected = {f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")}
    if unexpected or set(tensors) != expected:
        missing = sorted(expected - set(tensors), key=lambda n: (len(n), n))[:4]
        extra = sorted(set(tensors) - expected, key=lambda n: (len(n), n))[:4]
        raise ImportRefusedError(
            f"{source}: expected layers.0..{num_layers - 1}.key/value for the model's "
            f"{num_layers} layers; found K/V of {len(found_layers)} layers "
            f"({found_layers[:8]}{'...' if len(found_layers) > 8 else ''}), missing "
            f"{missing}, unexpected {extra}. {_FIX}")
    keys = [tensors[f"layers.{i}.key"] for i in range(num_layers)]
    values = [tensors[f"layers.{i}.value"] for i in range(num_layers)]
    dims = {t.dim() for t in keys + values}
    if dims == {4}:
        batches = {t.shape[0] for t in keys + values}
        if batches != {1}:
            raise ImportRefusedError(
                f"{source}: 4-D tensors of batch {sorted(batches)}; expected HF's cache "
                f"layout [1, num_kv_heads, L, head_dim] (one prefix). Save one row. {_FIX}")
        return [k[0] for k in keys], [v[0] for v in values], "[1, num_kv_heads, L, head_dim]"
    if dims != {3}:
        raise ImportRefusedError(
            f"{source}: tensors of {sorted(dims)} dimensions; expected all "
            f"[num_kv_heads, L, head_dim] or all [1, num_kv_heads, L, head_dim]. {_FIX}")
    return keys, values, "[num_kv_heads, L, head_dim]"


def import_past_kv(path: str | Path, model_dir: str | Path, *, dtype: str | None = None,
                   build_args: dict[str, Any] | None = None) -> DeepThinkAdapter:
    """A KV-prefix adapter (method "past-kv") holding the K/V of `path`, bound to the
    model `model_dir` (a directory or a hub id). `dtype` None keeps the file's dtype.
    Raises ImportRefusedError."""
    from transformers import AutoConfig

    path = Path(path)
    model_dir, model_name = resolve_model(model_dir, error=ImportRefusedError)
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_model_supported(model_config, str(model_dir))
    tensors, metadata = read_past_kv(path)
    num_layers, _, _ = kv_geometry(model_config)
    keys, values, layout = _per_layer(tensors, num_layers, str(path))
    check_prefix_kv(keys, values, model_config, str(path), _FIX)
    dtypes = {t.dtype for t in keys + values}
    if dtype is None:
        if len(dtypes) != 1:
            raise ImportRefusedError(
                f"{path}: tensors of dtypes {sorted(map(str, dtypes))}; expected one dtype. "
                f"Pass `dtype` float32 (or bfloat16 / float16) to store them in one.")
        try:
            dtype_name(keys[0].dtype)
        except ValueError:
            raise ImportRefusedError(
                f"{path}: dtype {keys[0].dtype}; adapters store float32, float16 or "
                f"bfloat16. Pass `dtype` float32 to convert.") from None
    fingerprint = ModelFingerprint.from_checkpoint(model_dir, model_config)
    provenance = {
        "source": METHOD,
        "source_path": str(path.resolve()),
        "files": {path.name: file_sha256(path)},
        "layout": layout,
        "source_dtype": sorted(str(d).replace("torch.", "") for d in dtypes),
        "metadata": metadata,
    }
    return make_adapter(model_name, fingerprint, METHOD, keys, values, prefix_special_ids=[],
                        provenance=provenance, dtype=dtype, build_args=build_args or {})
