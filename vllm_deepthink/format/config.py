"""The adapter config: `DeepThinkConfig`, the file names and the dtypes of the format.

Layout of an adapter directory (a contract, see adapters_store/README.md)::

    deepthink_config.json        DeepThinkConfig as JSON
    deepthink_model.safetensors  layers.{i}.key / layers.{i}.value, each
                                 [num_kv_heads, prefix_len, head_dim]; header
                                 metadata "deepthink_config_sha256"

The file names are our own on purpose so that PEFT and vLLM's LoRA resolvers
never take a Deep-Thinking adapter for a LoRA (they look for adapter_config.json).
Nothing in the format package imports vLLM or transformers, and nothing is ever
unpickled.
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

from vllm_deepthink.format.errors import AdapterFormatError
from vllm_deepthink.format.fingerprint import ModelFingerprint

FORMAT_VERSION = 1
CONFIG_NAME = "deepthink_config.json"
WEIGHTS_NAME = "deepthink_model.safetensors"
CONFIG_DIGEST_KEY = "deepthink_config_sha256"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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
        selection_trace: one dict per iteration of the kept run, e.g. {"iteration": 3,
            "dev_acc": 0.71, "dev_acc_norm": 0.71, "dev_counts": [120, 180]}.
        selection: how the iteration was chosen (select_on, the protocol, the guard's
            numbers and, for a search, every candidate's trace); {} for older adapters.
        label_calibration: per-label log-priors of the kept iteration for
            classification tasks ({"label_words", "label_token_ids", "content-free":
            {"log_prior", "inputs"}, "dev-prior": {"log_prior", "n"}}), or None; a
            client applies one as vLLM `logit_bias` = -log_prior on the label tokens.
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
    selection: dict[str, Any] = field(default_factory=dict)
    label_calibration: dict[str, Any] | None = None
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
