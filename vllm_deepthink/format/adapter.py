"""The adapter itself: `DeepThinkAdapter` (config + per-layer K/V), saved and loaded
like a PEFT adapter (`save_pretrained` / `from_pretrained` mirror each other).

The weights file holds `layers.{i}.key` / `layers.{i}.value`, each
[num_kv_heads, prefix_len, head_dim] (K post-RoPE, as in HF's cache), and the
config's digest in its header, so a config and weights that do not belong
together are refused. Its sha256 identifies the weights everywhere else (the
serving side salts the prefix cache with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from vllm_deepthink.format.config import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    DeepThinkConfig,
    check_fingerprint,
    load_config_and_digest,
    torch_dtype,
)
from vllm_deepthink.format.errors import AdapterFormatError
from vllm_deepthink.format.fingerprint import ModelFingerprint


def resolve_adapter_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local directory of an adapter given as a path or a hub id (of a hub repository
    only the adapter's two files are fetched)."""
    from vllm_deepthink.format.hub import HubResolutionError, resolve_dir

    try:
        return resolve_dir(name_or_path, revision=revision, what="adapter",
                           allow_patterns=(CONFIG_NAME, WEIGHTS_NAME))
    except HubResolutionError as exc:
        raise AdapterFormatError(f"{exc} (expected a directory holding {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME})") from None


def _weights_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class DeepThinkAdapter:
    """A loaded adapter: its config and per-layer K/V, each [num_kv_heads, L, head_dim].

    Every KV-prefix method is a `DeepThinkAdapter` (`config.method` says which).
    """

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

    def as_cache(self, model_config, batch_size: int = 1, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        """A new transformers `DynamicCache` holding the adapter for `model(...,
        past_key_values=...)` or `generate` (transformers >= 5 takes Cache objects only;
        each call gives a fresh cache, since a forward pass appends to it). The query
        then sits at positions L.., as it does behind the server."""
        from vllm_deepthink.format.hf_cache import cache_from_kv

        return cache_from_kv(self.as_past_key_values(device, dtype), model_config, batch_size)

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
            "method": self.config.method,
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
                        expected_fingerprint: ModelFingerprint | None = None,
                        revision: str | None = None) -> DeepThinkAdapter:
        """Load and validate an adapter: a local directory or a hub id (ORG/NAME, resolved
        through the Hugging Face cache like PEFT's from_pretrained; `revision` picks a
        branch, tag or commit).

        If expected_fingerprint is given (the model the adapter will be used with),
        a mismatch is an AdapterFormatError naming the fields that differ.

        The checks run cheapest first, so a hostile directory costs no more than its
        config until it proves consistent: the config (size-capped, every field typed
        and bounded, token ids within the vocabulary), the fingerprint against the model,
        the weights file's size against the size the config implies, its header (the
        config's digest, the tensor names), and only then the tensors. Every refusal is
        an AdapterFormatError.
        """
        directory = resolve_adapter_dir(directory, revision)
        config, written_digest = load_config_and_digest(directory)
        if expected_fingerprint is not None:
            check_fingerprint(config, expected_fingerprint, str(directory))
        return cls._load_weights(_weights_path(directory), config, written_digest)

    @classmethod
    def _load_weights(cls, weights_path: Path, config: DeepThinkConfig,
                      written_digest: str) -> DeepThinkAdapter:
        """The adapter whose config is `config` (written with digest `written_digest`)
        from its weights file, every check after the config's."""
        source = str(weights_path)
        data, header = _read_weights(weights_path, config)
        metadata = header.get("__metadata__")
        found_digest = metadata.get(CONFIG_DIGEST_KEY) if isinstance(metadata, dict) else None
        # The digest of the config as written (before a format upgrade on read).
        if found_digest != written_digest:
            raise _config_mismatch(source, found_digest, written_digest)
        n = config.fingerprint.num_layers
        expected_names = {f"layers.{i}.{kind}" for i in range(n) for kind in ("key", "value")}
        names = set(header) - {"__metadata__"}
        if names != expected_names:
            missing = sorted(expected_names - names)[:4]
            extra = sorted(str(name)[:40] for name in names - expected_names)[:4]
            raise AdapterFormatError(
                f"{source}: expected tensors layers.0..{n - 1}.key/value; missing {missing}, "
                f"unexpected {extra}. Rebuild the adapter.")
        try:
            tensors = safetensors_load(data)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise AdapterFormatError(
                f"{source}: not a readable safetensors file ({exc}); it is truncated or "
                f"corrupt. Rebuild the adapter.") from None
        adapter = cls(config=config,
                      keys=[tensors[f"layers.{i}.key"] for i in range(n)],
                      values=[tensors[f"layers.{i}.value"] for i in range(n)],
                      digest=_weights_digest(data))
        adapter._validate_tensors(source)
        return adapter


def _weights_path(directory: Path) -> Path:
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterFormatError(
            f"{directory}: {WEIGHTS_NAME} is missing; expected it next to {CONFIG_NAME}. "
            f"Rebuild the adapter with `vllm-deepthink build`.")
    return weights_path


def _config_mismatch(source: str, found_digest: object, written_digest: str
                     ) -> AdapterFormatError:
    return AdapterFormatError(
        f"{source}: header {CONFIG_DIGEST_KEY} is {found_digest!r:.80} but "
        f"{CONFIG_NAME} hashes to {written_digest!r}: the config was edited or "
        f"belongs to other weights. Rebuild the adapter or restore the config.")


@dataclass(frozen=True)
class WeightsCheck:
    """What a full check of an adapter's weights file leaves behind (no tensor): its
    sha256, the config digest its header holds, and the largest magnitude of its values
    (finite: whether they fit a narrower dtype follows from it)."""

    digest: str
    config_digest: str
    max_abs: float


# Weights files checked in this process: (path, size, mtime_ns) -> WeightsCheck. A file
# is read and hashed once; registering it again (another name, another registry, a
# restart of the registry) costs a stat. Bounded, least recently used out first.
_CHECKED: OrderedDict[tuple[str, int, int], WeightsCheck] = OrderedDict()
_CHECKED_LOCK = threading.Lock()
MAX_CHECKED_FILES = 1 << 16  # about 250 bytes each


def check_adapter(directory: str | Path, config: DeepThinkConfig, written_digest: str
                  ) -> WeightsCheck:
    """Every check of `DeepThinkAdapter.from_pretrained` on the weights of the adapter in
    `directory` (local), whose config `config` (read with `load_config_and_digest`, its
    fingerprint already checked) was written with digest `written_digest`, without
    keeping a tensor: what the serving frontend needs (the digest) at the cost of a stat
    once the file was checked in this process, keyed by (path, size, mtime). A file
    rewritten in place gets a new mtime and is checked again."""
    weights_path = _weights_path(Path(directory))
    stat = weights_path.stat()
    # A rewrite of the same size within the same mtime tick would go unseen here; the
    # workers hash what they read and refuse weights other than the registered digest.
    key = (str(weights_path), stat.st_size, stat.st_mtime_ns)
    with _CHECKED_LOCK:
        checked = _CHECKED.get(key)
        if checked is not None:
            _CHECKED.move_to_end(key)
    if checked is None:
        adapter = DeepThinkAdapter._load_weights(weights_path, config, written_digest)
        max_abs = max((float(t.abs().max()) for t in (*adapter.keys, *adapter.values)
                       if t.numel()), default=0.0)
        checked = WeightsCheck(adapter.digest, written_digest, max_abs)
        with _CHECKED_LOCK:
            _CHECKED[key] = checked
            while len(_CHECKED) > MAX_CHECKED_FILES:
                _CHECKED.popitem(last=False)
    elif checked.config_digest != written_digest:  # the config changed, the weights not
        raise _config_mismatch(str(weights_path), checked.config_digest, written_digest)
    return checked


def clear_checked_files() -> None:
    """Forget every weights file checked in this process (check_adapter)."""
    with _CHECKED_LOCK:
        _CHECKED.clear()


def _read_weights(path: Path, config: DeepThinkConfig) -> tuple[bytes, dict]:
    """(the bytes of an adapter's weights file, its parsed safetensors header), read
    through one open file. Before the tensor data is read, the file's size must be the
    size the config implies: 8 bytes (the header's length, little-endian) + the header
    (JSON, at most `_max_header_bytes`) + `config.kv_bytes()`. The header is then parsed
    from the bytes read, the same bytes the tensors are loaded from."""
    source = str(path)
    payload = config.kv_bytes()
    max_header = _max_header_bytes(config)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header_len = int.from_bytes(handle.read(8), "little")
            expected = 8 + header_len + payload
            if size < 8 or header_len > max_header or size != expected:
                raise AdapterFormatError(
                    f"{source}: {size} bytes, but the config implies 8 + {header_len} (the "
                    f"safetensors header, at most {max_header}) + {payload} (num_layers * 2 "
                    f"tensors of [num_kv_heads, prefix_len, head_dim] {config.dtype}) = "
                    f"{expected if header_len <= max_header else 'more'} bytes: the file is "
                    f"truncated, padded or belongs to another config. Rebuild the adapter.")
            handle.seek(0)
            data = handle.read(size + 1)
    except OSError as exc:
        raise AdapterFormatError(
            f"{source}: cannot be read ({type(exc).__name__}: {exc})") from None
    if len(data) != size or int.from_bytes(data[:8], "little") != header_len:
        raise AdapterFormatError(f"{source}: the file changed while it was read; load the "
                                 f"adapter again once it is written.")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(
            f"{source}: not a readable safetensors file (its header is not JSON: "
            f"{str(exc)[:80]}); it is truncated or corrupt. Rebuild the adapter.") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(
            f"{source}: not a readable safetensors file (its header is not a JSON object); "
            f"it is corrupt. Rebuild the adapter.")
    return data, header


def _max_header_bytes(config: DeepThinkConfig) -> int:
    """A bound on the safetensors header of an adapter: the metadata plus, per tensor,
    its name, dtype, shape and two offsets (about 130 bytes at the largest sizes)."""
    return 4096 + 256 * 2 * config.fingerprint.num_layers
