"""Test adapters built directly from HF K/V: noisy copies of the model's own K/V.

An adapter here is the model's own K/V of some demo ids, perturbed (so serving
it is not plain in-context learning) and saved in the adapter format. (The real
builder is `vllm_deepthink.producers.deepthink.builder.build_adapter`.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_models import CORPUS
from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig
from vllm_deepthink.format import ModelFingerprint


def demo_ids(tokenizer, length: int, offset: int = 0) -> list[int]:
    """`length` demo token ids: BOS + corpus text (rotated by `offset`), cut to length."""
    text = "\n\n".join(CORPUS[offset:] + CORPUS[:offset])
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    while len(ids) < length:
        ids = ids + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:length]


def noisy_adapter(model, tokenizer, out_dir: str | Path, prefix_len: int, *,
                  noise: float = 0.3, seed: int = 0, offset: int = 0) -> DeepThinkAdapter:
    """Save an adapter: K/V of `prefix_len` demo ids, each tensor moved by
    `noise` times its own std in a random direction."""
    ids = demo_ids(tokenizer, prefix_len, offset)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    generator = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layer in out.past_key_values.layers:
        for source, target in ((layer.keys, keys), (layer.values, values)):
            kv = source[0].float()                          # [kv_heads, L, D]
            kv = kv + noise * kv.std() * torch.randn(kv.shape, generator=generator)
            target.append(kv.contiguous())
    config = DeepThinkConfig(
        base_model_name_or_path=str(getattr(model, "name_or_path", "")),
        fingerprint=ModelFingerprint.from_model(model), prefix_len=prefix_len,
        dtype="float32", demos_text=tokenizer.decode(ids), demo_token_ids=ids,
        optimizer="momentum", optimizer_params={"step_size": 0.01, "beta": 0.9},
        position_mode="published", iterations_run=1, selected_iteration=1,
        build_args={"test_noise": noise, "seed": seed})
    adapter = DeepThinkAdapter(config=config, keys=keys, values=values)
    adapter.save_pretrained(out_dir)
    return adapter


def count_reads(monkeypatch) -> list[Path]:
    """The reads of adapter weights files in this process from now on: one entry (the
    file's path) per read (the format's one reader of a weights file)."""
    from vllm_deepthink.format import adapter as adapter_module

    reads, read = [], adapter_module._read_weights
    monkeypatch.setattr(adapter_module, "_read_weights",
                        lambda path, config: reads.append(Path(path)) or read(path, config))
    return reads


# Keys a format_version 1 config has (written by vllm-deepthink before methods existed).
V1_KEYS = ("base_model_name_or_path", "fingerprint", "prefix_len", "dtype", "demos_text",
           "demo_token_ids", "optimizer", "optimizer_params", "position_mode", "iterations_run",
           "selected_iteration", "selection_trace", "task", "build_args", "builder_version",
           "format_version")
# Keys the first format_version 2 config had (the code of 4abdbc3: methods, before
# selection, label_calibration and compression were recorded).
V2_FIRST_KEYS = (*V1_KEYS, "method", "num_virtual_tokens", "prefix_special_ids", "provenance")


def write_old_adapter(adapter: DeepThinkAdapter, out_dir: str | Path, version: int,
                      keys: tuple[str, ...]) -> Path:
    """Write `adapter` the way an older vllm-deepthink did: format_version `version`, the
    config keys `keys` only (each present in the adapter's config), the header of that
    config as written."""
    import hashlib
    import json

    from safetensors.torch import save as safetensors_save

    data = {key: value for key, value in adapter.config.to_dict().items() if key in keys}
    data["format_version"] = version
    assert set(data) == set(keys)
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    tensors = {}
    for i, (k, v) in enumerate(zip(adapter.keys, adapter.values)):
        tensors[f"layers.{i}.key"] = k.contiguous()
        tensors[f"layers.{i}.value"] = v.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "deepthink_model.safetensors").write_bytes(safetensors_save(tensors, metadata={
        "deepthink_config_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "format": "deepthink", "format_version": str(version)}))
    (out_dir / "deepthink_config.json").write_text(
        json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def write_v1_adapter(adapter: DeepThinkAdapter, out_dir: str | Path) -> Path:
    """Write a Deep-Thinking adapter the way format_version 1 did (the code of main
    before format v2): the v1 config keys only, the v1 header."""
    return write_old_adapter(adapter, out_dir, 1, V1_KEYS)


def write_first_v2_adapter(adapter: DeepThinkAdapter, out_dir: str | Path) -> Path:
    """Write an adapter the way the first format_version 2 code did: no "selection",
    "label_calibration" or "compression" key (they default when read)."""
    return write_old_adapter(adapter, out_dir, 2, V2_FIRST_KEYS)
