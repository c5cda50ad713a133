"""A base-model fingerprint: the facts an adapter's K/V depend on.

Computed from an in-memory HF model (builder) or from a checkpoint directory
(server side, without instantiating the model). Both hash the input embedding
as contiguous float32 bytes, so the same checkpoint gives the same digest (a model
loaded in a narrower dtype is fingerprinted from its checkpoint: from_model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_deepthink.format.errors import AdapterFormatError, describe
from vllm_deepthink.format.hf_config import kv_geometry, text_config

_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq",
              "partial_rotary_factor", "sliding_window", "layer_types",
              "max_position_embeddings", "n_positions", "query_pre_attn_scalar")

# Bounds of the integer fields a fingerprint read from a file may hold: far above any
# real model, low enough that sizes computed from them stay cheap to check.
INT_FIELD_BOUNDS = {
    "num_layers": (1, 1 << 12),
    "num_kv_heads": (1, 1 << 12),
    "head_dim": (1, 1 << 16),
    "hidden_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 31),   # token ids are int32 in vLLM
}
# A sha256 as the format writes it (hashlib hexdigest).
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Checkpoint tensor names of the input embedding, by common architecture.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight",
                       "word_embeddings.weight")


@dataclass(frozen=True)
class ModelFingerprint:
    """Architecture facts and an embedding digest of a base model.

    Attributes:
        architecture: HF architecture class name, e.g. "LlamaForCausalLM".
        model_type: HF model_type of the text model, e.g. "llama", "gpt2".
        num_layers: decoder layers (one K/V pair each).
        num_kv_heads: key/value heads per layer.
        head_dim: size of one attention head.
        hidden_size: model width.
        vocab_size: embedding rows.
        rope: rotary / position settings that change K (theta, scaling, local
            base frequency, sliding window, layer types, max positions).
        embedding_sha256: sha256 of the input embedding as float32 bytes.
    """

    architecture: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: dict[str, Any]
    embedding_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "fingerprint") -> ModelFingerprint:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or any(n not in data for n in names):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise AdapterFormatError(
                f"{source}: fingerprint must hold {names}, found {found}. Rebuild the adapter.")
        check_fields(data, source)
        return cls(**{n: data[n] for n in names})

    def mismatches(self, other: ModelFingerprint) -> list[str]:
        """Human-readable differences, 'field: adapter X, model Y'; empty if equal."""
        if self == other:  # equal values normalise equal: every registration's case
            return []
        diffs = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if _normalise(mine) != _normalise(theirs):
                diffs.append(f"{f.name}: adapter {mine!r}, model {theirs!r}")
        return diffs

    @classmethod
    def from_hf_config(cls, config: Any, embedding: torch.Tensor) -> ModelFingerprint:
        text = text_config(config)
        num_layers, num_kv_heads, head_dim = kv_geometry(config)
        architectures = getattr(config, "architectures", None) or [type(config).__name__]
        rope = {}
        for key in _ROPE_KEYS:
            value = getattr(text, key, None)
            if value is not None:
                rope[key] = _normalise(value)
        return cls(architecture=architectures[0],
                   model_type=text.model_type,
                   num_layers=num_layers,
                   num_kv_heads=num_kv_heads,
                   head_dim=head_dim,
                   hidden_size=int(text.hidden_size),
                   vocab_size=int(text.vocab_size),
                   rope=rope,
                   embedding_sha256=embedding_digest(embedding))

    @classmethod
    def from_model(cls, model: Any) -> ModelFingerprint:
        """Fingerprint of an instantiated HF model. A model loaded in a narrower dtype
        than float32 (e.g. bfloat16) holds rounded embeddings: its checkpoint (the
        config's _name_or_path, a directory or a cached hub id) is fingerprinted instead,
        so an adapter built in bfloat16 matches the checkpoint the server fingerprints."""
        weight = model.get_input_embeddings().weight
        source = getattr(model.config, "_name_or_path", "") or ""
        if weight.dtype != torch.float32 and source:
            try:
                return cls.from_checkpoint(source, hf_config=model.config)
            except (OSError, ValueError):
                pass  # no checkpoint to read: the in-memory weights are all there is
        return cls.from_hf_config(model.config, weight)

    @classmethod
    def from_checkpoint(cls, model: str | Path, hf_config: Any = None,
                        revision: str | None = None) -> ModelFingerprint:
        """Fingerprint of an HF checkpoint (a local directory or a hub id, see hub.py),
        reading only its config and the embedding tensor (never instantiates the model)."""
        from vllm_deepthink.format.hub import MODEL_FILES, resolve_dir

        model_dir = resolve_dir(model, revision=revision, what="model",
                                allow_patterns=MODEL_FILES)
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_dir)
        return cls.from_hf_config(hf_config, _read_embedding(model_dir))


def check_fields(data: dict[str, Any], source: str) -> None:
    """Raise AdapterFormatError naming the first fingerprint field of `data` (read from a
    file) whose type or range is wrong: the integers are ints (not bool) within
    INT_FIELD_BOUNDS, the names strings, rope an object, the digest 64 hex digits."""
    for name, (low, high) in INT_FIELD_BOUNDS.items():
        value = data[name]
        if type(value) is not int or not low <= value <= high:
            raise AdapterFormatError(
                f"{source}: fingerprint.{name} must be an integer in [{low}, {high}], found "
                f"{describe(value)}. The file was edited or is not an adapter: rebuild it.")
    for name in ("architecture", "model_type"):
        if not isinstance(data[name], str) or len(data[name]) > 256:
            raise AdapterFormatError(
                f"{source}: fingerprint.{name} must be a string (a Hugging Face "
                f"{name.replace('_', ' ')}), found {describe(data[name])}. Rebuild the adapter.")
    if not isinstance(data["rope"], dict):
        raise AdapterFormatError(
            f"{source}: fingerprint.rope must be an object of rotary settings, found "
            f"{describe(data['rope'])}. Rebuild the adapter.")
    digest = data["embedding_sha256"]
    if not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
        raise AdapterFormatError(
            f"{source}: fingerprint.embedding_sha256 must be 64 lowercase hex digits, found "
            f"{describe(digest)}. Rebuild the adapter.")


def embedding_digest(embedding: torch.Tensor) -> str:
    data = embedding.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _read_embedding(model_dir: Path) -> torch.Tensor:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            if name.endswith(_EMBEDDING_SUFFIXES):
                files = [model_dir / file]
                break
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith(_EMBEDDING_SUFFIXES):
                    return handle.get_tensor(name)
    raise FileNotFoundError(
        f"{model_dir}: found no input-embedding tensor (names ending in "
        f"{_EMBEDDING_SUFFIXES}) in its safetensors files; the model fingerprint needs "
        f"a local safetensors checkpoint.")


def _normalise(value: Any) -> Any:
    """JSON round-trip so tuples/lists and nested dicts compare equal after save/load."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
