"""The Deep-Thinking adapter format: a directory with a JSON config and safetensors.

Layout of an adapter directory (a contract, see adapters_store/README.md)::

    deepthink_config.json        DeepThinkConfig as JSON
    deepthink_model.safetensors  layers.{i}.key / layers.{i}.value, each
                                 [num_kv_heads, prefix_len, head_dim]; header
                                 metadata "deepthink_config_sha256"

The file names are our own on purpose so that PEFT and vLLM's LoRA resolvers
never take a Deep-Thinking adapter for a LoRA (they look for adapter_config.json).
Nothing here imports vLLM and nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from vllm_deepthink.fingerprint import ModelFingerprint

FORMAT_VERSION = 1
CONFIG_NAME = "deepthink_config.json"
WEIGHTS_NAME = "deepthink_model.safetensors"
CONFIG_DIGEST_KEY = "deepthink_config_sha256"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be used; the message says why and what to do."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise AdapterFormatError(
        f"adapter dtype {dtype} is not supported; expected one of {sorted(_DTYPES)}")


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise AdapterFormatError(
            f"adapter dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class DeepThinkConfig:
    """Everything needed to reproduce, verify and serve one adapter.

    Attributes:
        base_model_name_or_path: the model the K/V were computed with (path or name).
        fingerprint: architecture facts and an embedding digest of that model;
            an adapter is only served on a model with the same fingerprint.
        prefix_len: L, the number of prefix positions the adapter occupies; the
            query of a request starts at position L.
        dtype: dtype of the stored tensors ("float32", "float16", "bfloat16").
        demos_text: the demonstration string the K/V were built from.
        demo_token_ids: its token ids (special tokens included), len == prefix_len.
        optimizer: "momentum" (published v1 code) or "ema" (ACL'24 gate).
        optimizer_params: {"step_size", "beta"} for momentum, {"eta"} for ema.
        position_mode: "published" (keys updated as the published code does) or
            "aligned" (new keys rotated back by L positions before the update).
        iterations_run: how many Deep-Thinking iterations were computed.
        selected_iteration: the iteration whose K/V are stored (1 = plain ICL).
        selection_trace: one dict per iteration, e.g. {"iteration": 3, "dev_acc": 0.71}.
        task: how the demos were made, when built from a task directory
            (name, template, label_words, separator, shots_per_class, seed), else None.
        build_args: the builder's arguments, for provenance.
        builder_version: vllm_deepthink version that built the adapter.
        format_version: version of this format; readers refuse other versions.
    """

    base_model_name_or_path: str
    fingerprint: ModelFingerprint
    prefix_len: int
    dtype: str
    demos_text: str
    demo_token_ids: list[int]
    optimizer: str
    optimizer_params: dict[str, float]
    position_mode: str
    iterations_run: int
    selected_iteration: int
    selection_trace: list[dict[str, Any]] = field(default_factory=list)
    task: dict[str, Any] | None = None
    build_args: dict[str, Any] = field(default_factory=dict)
    builder_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fingerprint"] = self.fingerprint.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DeepThinkConfig:
        if not isinstance(data, dict):
            raise AdapterFormatError(
                f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{source}: format_version {version!r} is not supported; this vllm-deepthink "
                f"reads format_version {FORMAT_VERSION}. Rebuild the adapter with "
                f"`vllm-deepthink build` or install the vllm-deepthink that wrote it.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise AdapterFormatError(
                f"{source}: missing required keys {missing}; expected every field of "
                f"DeepThinkConfig. The file is incomplete or was not written by "
                f"vllm-deepthink: rebuild the adapter.")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs = {name: data[name] for name in fields if name in data}
        kwargs["fingerprint"] = ModelFingerprint.from_dict(data["fingerprint"], source)
        config = cls(**kwargs)
        config._check(source)
        return config

    def _check(self, source: str) -> None:
        if not isinstance(self.prefix_len, int) or self.prefix_len < 1:
            raise AdapterFormatError(
                f"{source}: prefix_len must be a positive integer, found {self.prefix_len!r}")
        if len(self.demo_token_ids) != self.prefix_len:
            raise AdapterFormatError(
                f"{source}: demo_token_ids has {len(self.demo_token_ids)} ids but prefix_len "
                f"is {self.prefix_len}; they must be equal. Rebuild the adapter.")
        torch_dtype(self.dtype)
        if self.optimizer not in ("momentum", "ema"):
            raise AdapterFormatError(
                f"{source}: optimizer must be 'momentum' or 'ema', found {self.optimizer!r}")
        if self.position_mode not in ("published", "aligned"):
            raise AdapterFormatError(
                f"{source}: position_mode must be 'published' or 'aligned', "
                f"found {self.position_mode!r}")


def _weights_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class DeepThinkAdapter:
    """A loaded adapter: its config and per-layer K/V, each [num_kv_heads, L, head_dim]."""

    config: DeepThinkConfig
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # sha256 of the safetensors file; identifies the weights (used in cache salts).
    digest: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def prefix_len(self) -> int:
        return self.config.prefix_len

    def as_past_key_values(self, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None):
        """Per-layer (key, value) pairs shaped [1, num_kv_heads, L, head_dim] for HF."""
        return [(k.unsqueeze(0).to(device=device, dtype=dtype),
                 v.unsqueeze(0).to(device=device, dtype=dtype))
                for k, v in zip(self.keys, self.values)]

    def _validate_tensors(self, source: str) -> None:
        fp = self.config.fingerprint
        expected_shape = (fp.num_kv_heads, self.config.prefix_len, fp.head_dim)
        expected_dtype = torch_dtype(self.config.dtype)
        if len(self.keys) != fp.num_layers or len(self.values) != fp.num_layers:
            raise AdapterFormatError(
                f"{source}: expected {fp.num_layers} layers of keys and values (from the "
                f"config's fingerprint), found {len(self.keys)} keys and {len(self.values)} "
                f"values. The weights do not belong to this config: rebuild the adapter.")
        for kind, tensors in (("key", self.keys), ("value", self.values)):
            for i, t in enumerate(tensors):
                name = f"layers.{i}.{kind}"
                if tuple(t.shape) != expected_shape:
                    raise AdapterFormatError(
                        f"{source}: tensor {name} has shape {tuple(t.shape)}, expected "
                        f"[num_kv_heads, prefix_len, head_dim] = {list(expected_shape)}. "
                        f"Rebuild the adapter.")
                if t.dtype != expected_dtype:
                    raise AdapterFormatError(
                        f"{source}: tensor {name} has dtype {t.dtype}, the config says "
                        f"{self.config.dtype}. Rebuild the adapter.")
                if not torch.isfinite(t).all():
                    raise AdapterFormatError(
                        f"{source}: tensor {name} contains NaN or Inf values. The build "
                        f"diverged or the file is corrupt: rebuild the adapter (a smaller "
                        f"step size or fewer iterations help a diverging build).")

    def to_safetensors_bytes(self) -> bytes:
        tensors = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"layers.{i}.key"] = k.detach().contiguous().cpu()
            tensors[f"layers.{i}.value"] = v.detach().contiguous().cpu()
        return safetensors_save(tensors, metadata={
            CONFIG_DIGEST_KEY: self.config.digest(),
            "format": "deepthink",
            "format_version": str(FORMAT_VERSION),
        })

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter directory; returns its path. Mirrors from_pretrained."""
        self._validate_tensors("adapter to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_safetensors_bytes()
        # Write to temporary names first so a crash never leaves a mixed adapter.
        tmp_weights = directory / (WEIGHTS_NAME + ".tmp")
        tmp_config = directory / (CONFIG_NAME + ".tmp")
        tmp_weights.write_bytes(data)
        tmp_config.write_text(self.config.to_json(), encoding="utf-8")
        tmp_weights.replace(directory / WEIGHTS_NAME)
        tmp_config.replace(directory / CONFIG_NAME)
        self.digest = _weights_digest(data)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path,
                        expected_fingerprint: ModelFingerprint | None = None
                        ) -> DeepThinkAdapter:
        """Load and validate an adapter directory.

        If expected_fingerprint is given (the model the adapter will be used with),
        a mismatch is an AdapterFormatError naming the fields that differ.
        """
        directory = Path(directory)
        config = load_config(directory)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise AdapterFormatError(
                f"{directory}: {WEIGHTS_NAME} is missing; expected it next to {CONFIG_NAME}. "
                f"Rebuild the adapter with `vllm-deepthink build`.")
        data = weights_path.read_bytes()
        source = str(weights_path)
        try:
            tensors = safetensors_load(data)
            metadata = _safetensors_metadata(data)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise AdapterFormatError(
                f"{source}: not a readable safetensors file ({exc}); it is truncated or "
                f"corrupt. Rebuild the adapter.") from None
        found_digest = metadata.get(CONFIG_DIGEST_KEY)
        if found_digest != config.digest():
            raise AdapterFormatError(
                f"{source}: header {CONFIG_DIGEST_KEY} is {found_digest!r} but "
                f"{CONFIG_NAME} hashes to {config.digest()!r}: the config was edited or "
                f"belongs to other weights. Rebuild the adapter or restore the config.")
        n = config.fingerprint.num_layers
        expected_names = {f"layers.{i}.{kind}" for i in range(n) for kind in ("key", "value")}
        if set(tensors) != expected_names:
            missing = sorted(expected_names - set(tensors))[:4]
            extra = sorted(set(tensors) - expected_names)[:4]
            raise AdapterFormatError(
                f"{source}: expected tensors layers.0..{n - 1}.key/value; missing {missing}, "
                f"unexpected {extra}. Rebuild the adapter.")
        adapter = cls(config=config,
                      keys=[tensors[f"layers.{i}.key"] for i in range(n)],
                      values=[tensors[f"layers.{i}.value"] for i in range(n)],
                      digest=_weights_digest(data))
        adapter._validate_tensors(source)
        if expected_fingerprint is not None:
            check_fingerprint(config, expected_fingerprint, str(directory))
        return adapter


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {}) or {}


def load_config(directory: str | Path) -> DeepThinkConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(
            f"{directory}: no such adapter directory; expected a directory holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (build one with `vllm-deepthink build`).")
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = (" It looks like a PEFT/LoRA adapter, not a Deep-Thinking adapter."
                if (directory / "adapter_config.json").exists() else "")
        raise AdapterFormatError(
            f"{directory}: {CONFIG_NAME} is missing; expected a Deep-Thinking adapter "
            f"directory.{hint} Build one with `vllm-deepthink build`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc}). Rebuild the adapter.") from None
    return DeepThinkConfig.from_dict(data, str(path))


def check_fingerprint(config: DeepThinkConfig, expected: ModelFingerprint, source: str) -> None:
    diffs = config.fingerprint.mismatches(expected)
    if diffs:
        raise AdapterFormatError(
            f"{source}: adapter was built for a different base model "
            f"({config.base_model_name_or_path}); fingerprint fields differ: "
            + "; ".join(diffs)
            + ". Serve it with the model it was built on, or rebuild it on this model.")
