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

One format serves every KV-prefix method (`METHODS`): Deep-Thinking adapters built
by `vllm-deepthink build`, PEFT prompt-learning adapters and raw per-layer K/V
imported by `vllm-deepthink import`. Format version 2 added the method, its
provenance and the placeholder ids of methods without demonstration tokens;
version-1 configs (Deep-Thinking only) are upgraded when read.
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

from vllm_deepthink.format.compression import COMPRESSED, check_compression_record
from vllm_deepthink.format.errors import AdapterFormatError, describe, read_json
from vllm_deepthink.format.fingerprint import SHA256_HEX, ModelFingerprint

FORMAT_VERSION = 2
# Versions this reader understands; older ones are upgraded on read (`upgrade_config_data`).
READABLE_FORMAT_VERSIONS = (1, 2)
CONFIG_NAME = "deepthink_config.json"
WEIGHTS_NAME = "deepthink_model.safetensors"
CONFIG_DIGEST_KEY = "deepthink_config_sha256"

DEEPTHINK = "deepthink"
# method -> where its K/V come from. PEFT methods are named after PEFT's peft_type.
METHODS = {
    DEEPTHINK: "Deep-Thinking (iterative forward tuning) of demonstrations: vllm-deepthink build",
    "peft-prefix-tuning": "PEFT PREFIX_TUNING (with or without prefix_projection)",
    "peft-prompt-tuning": "PEFT PROMPT_TUNING (soft prompt)",
    "peft-p-tuning": "PEFT P_TUNING (prompt encoder, MLP or LSTM)",
    "peft-multitask-prompt-tuning": "PEFT MULTITASK_PROMPT_TUNING, one task id per adapter",
    "peft-cpt": "PEFT CPT (context-aware prompt tuning)",
    "peft-cartridge": "PEFT CARTRIDGE (a trained KV prefix, served like prefix tuning)",
    "past-kv": "raw per-layer K/V (past_key_values) from a safetensors file",
    "compressed": "another adapter's K/V compressed to fewer positions: vllm-deepthink compress",
}
# Fields that only Deep-Thinking adapters carry (None / empty for every other method).
DEEPTHINK_FIELDS = ("demos_text", "demo_token_ids", "optimizer", "optimizer_params",
                    "position_mode", "iterations_run", "selected_iteration")
# The token id the frontend puts at prefix positions that have no token of their own
# (soft prompts, learned or imported K/V). Any valid id would do: the K/V of those
# positions come from the adapter, and the cache salt keeps the blocks apart from a
# plain prompt that uses the same ids. 0 is a valid id of every vocabulary.
PLACEHOLDER_TOKEN_ID = 0

# Prefix positions an adapter may occupy: far above any model's context, low enough that
# the placeholder ids and the weights size computed from it stay cheap.
MAX_PREFIX_LEN = 1 << 24

# The JSON type of each field read from a file (None allowed where the field may be null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "base_model_name_or_path": (str,), "dtype": (str,), "method": (str,),
    "num_virtual_tokens": (int, type(None)), "prefix_special_ids": (list,),
    "provenance": (dict,), "demos_text": (str, type(None)),
    "demo_token_ids": (list, type(None)), "optimizer": (str, type(None)),
    "optimizer_params": (dict, type(None)), "position_mode": (str, type(None)),
    "iterations_run": (int, type(None)), "selected_iteration": (int, type(None)),
    "selection_trace": (list,), "selection": (dict,), "label_calibration": (dict, type(None)),
    "task": (dict, type(None)), "compression": (dict, type(None)), "build_args": (dict,),
    "builder_version": (str,),
}

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
    """Everything needed to reproduce, verify and serve one KV-prefix adapter.

    The adapter is a per-layer K/V prefix of `prefix_len` positions in front of the
    query, whatever produced it (`method`). Fields marked "deepthink" are set only
    for `method="deepthink"` and are None (or empty) otherwise.

    Attributes:
        base_model_name_or_path: the model the K/V were computed with (path or name).
        fingerprint: architecture facts and an embedding digest of that model;
            an adapter is only served on a model with the same fingerprint.
        prefix_len: L, the number of prefix positions the adapter occupies; the
            query of a request starts at position L.
        dtype: dtype of the stored tensors ("float32", "float16", "bfloat16").
        method: what produced the K/V, one of `METHODS`: "deepthink",
            "peft-prefix-tuning", "peft-prompt-tuning", "peft-p-tuning",
            "peft-multitask-prompt-tuning", "peft-cpt", "peft-cartridge", "past-kv",
            "compressed".
        num_virtual_tokens: every method but deepthink: the prefix positions that have
            no token id (PEFT's num_virtual_tokens; L for past-kv). None for deepthink.
        prefix_special_ids: every method but deepthink: real token ids that end the
            prefix after the virtual tokens, e.g. [BOS] when the adapter was used
            with `tokenizer(text)`, which puts BOS after PEFT's virtual tokens.
            prefix_len == num_virtual_tokens + len(prefix_special_ids).
        provenance: where the K/V came from, for every method but deepthink: "source"
            (e.g. "peft", "past-kv"), "files" ({file name: sha256} of the inputs), and
            per source e.g. "peft_version", "peft_type", "task_id", "layout".
        demos_text: deepthink: the demonstration string the K/V were built from.
        demo_token_ids: deepthink: its token ids (special tokens included),
            len == prefix_len.
        optimizer: deepthink: "momentum" (published v1 code) or "ema" (ACL'24 gate).
        optimizer_params: deepthink: {"step_size", "beta"} for momentum, {"eta"} for ema.
        position_mode: deepthink: "published" (keys updated as the published code
            does) or "aligned" (new keys rotated back by L positions before the update).
        iterations_run: deepthink: how many Deep-Thinking iterations were computed.
        selected_iteration: deepthink: the iteration whose K/V are stored (1 = plain ICL).
        selection_trace: deepthink: one dict per iteration of the kept run, e.g.
            {"iteration": 3, "dev_acc": 0.71, "dev_acc_norm": 0.71, "dev_counts": [120, 180]}.
        selection: deepthink: how the iteration was chosen (select_on, the protocol, the
            guard's numbers and, for a search, every candidate's trace); {} for older
            adapters.
        label_calibration: deepthink, classification tasks: per-label log-priors of the
            kept iteration ({"label_words", "label_token_ids", "content-free":
            {"log_prior", "inputs"}, "dev-prior": {"log_prior", "n"}}), or None; a
            client applies one as vLLM `logit_bias` = -log_prior on the label tokens.
        task: how the demos were made, when built from a task directory
            (name, template, label_words, separator, shots_per_class, seed), else None.
        build_args: the builder's or importer's arguments, for provenance.
        builder_version: vllm_deepthink version that built or imported the adapter.
        compression: method "compressed" only: how the K/V were made from another
            adapter (`vllm-deepthink compress`): {"source_method", "source_digest" (sha256
            of its weights), "source_prefix_len", "prefix_len" (k), "selection" (method,
            per-layer/head kept positions), "queries" ({"digest", "count", ...}),
            "distill" (None, or the settings, teacher and per-step trace)}; None for
            every other method. A compressed adapter may carry label_calibration
            (recomputed for its own prefix).
        format_version: version of this format (2); version-1 configs are upgraded
            when read, other versions are refused.
    """

    base_model_name_or_path: str
    fingerprint: ModelFingerprint
    prefix_len: int
    dtype: str
    method: str = DEEPTHINK
    num_virtual_tokens: int | None = None
    prefix_special_ids: list[int] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    demos_text: str | None = None
    demo_token_ids: list[int] | None = None
    optimizer: str | None = None
    optimizer_params: dict[str, float] | None = None
    position_mode: str | None = None
    iterations_run: int | None = None
    selected_iteration: int | None = None
    selection_trace: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    label_calibration: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    build_args: dict[str, Any] = field(default_factory=dict)
    builder_version: str = ""
    format_version: int = FORMAT_VERSION
    compression: dict[str, Any] | None = None

    def placeholder_token_ids(self) -> list[int]:
        """The L token ids the frontend puts in front of the query for this adapter.

        Their K/V never come from these ids (the connector writes the adapter's), but
        they are the prompt's first L ids for vLLM: deepthink uses its demonstration
        ids; other methods `PLACEHOLDER_TOKEN_ID` at each virtual position followed by
        `prefix_special_ids` (e.g. the real BOS id). The cache salt keeps these blocks
        apart from a plain prompt with the same ids.
        """
        if self.method == DEEPTHINK:
            return list(self.demo_token_ids)
        return [PLACEHOLDER_TOKEN_ID] * self.num_virtual_tokens + list(self.prefix_special_ids)

    def kv_bytes(self) -> int:
        """Bytes of the adapter's K/V as stored: num_layers * 2 tensors (key, value) of
        [num_kv_heads, prefix_len, head_dim] in `dtype`."""
        fp = self.fingerprint
        return (fp.num_layers * 2 * fp.num_kv_heads * self.prefix_len * fp.head_dim
                * torch_dtype(self.dtype).itemsize)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fingerprint"] = self.fingerprint.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def digest(self) -> str:
        return config_data_digest(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DeepThinkConfig:
        """Validate and build a config; a format_version 1 dict is upgraded first."""
        data = upgrade_config_data(data, source)
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
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Check the fields for the config's method; raises AdapterFormatError."""
        self._check(source)

    def _check(self, source: str) -> None:
        if type(self.prefix_len) is not int or not 1 <= self.prefix_len <= MAX_PREFIX_LEN:
            raise AdapterFormatError(
                f"{source}: prefix_len must be an integer in [1, {MAX_PREFIX_LEN}], found "
                f"{describe(self.prefix_len)}")
        for name, types in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, types) or isinstance(value, bool):
                expected = " or ".join("null" if t is type(None) else _JSON_NAMES[t]
                                       for t in types)
                raise AdapterFormatError(
                    f"{source}: {name} must be {expected}, found {describe(value)}. The file "
                    f"was edited or is not an adapter: rebuild or import it again.")
        torch_dtype(self.dtype)
        if self.method not in METHODS:
            raise AdapterFormatError(
                f"{source}: method {self.method!r} is unknown; expected one of "
                f"{sorted(METHODS)}. The adapter was written by a newer vllm-deepthink: "
                f"upgrade vllm-deepthink.")
        if self.method == DEEPTHINK:
            self._check_deepthink(source)
        else:
            self._check_imported(source)
        check_compression_record(self.method, self.compression, self.prefix_len, source)

    def _check_deepthink(self, source: str) -> None:
        missing = [name for name in DEEPTHINK_FIELDS if getattr(self, name) is None]
        if missing:
            raise AdapterFormatError(
                f"{source}: method 'deepthink' needs {missing}; found null. Rebuild the "
                f"adapter with `vllm-deepthink build`.")
        if self.num_virtual_tokens is not None or self.prefix_special_ids:
            raise AdapterFormatError(
                f"{source}: num_virtual_tokens / prefix_special_ids belong to imported "
                f"methods; a 'deepthink' adapter's prefix is its demo_token_ids. Rebuild "
                f"the adapter.")
        if len(self.demo_token_ids) != self.prefix_len:
            raise AdapterFormatError(
                f"{source}: demo_token_ids has {len(self.demo_token_ids)} ids but prefix_len "
                f"is {self.prefix_len}; they must be equal. Rebuild the adapter.")
        self._check_token_ids("demo_token_ids", self.demo_token_ids, source)
        label_ids = (self.label_calibration or {}).get("label_token_ids")
        if label_ids is not None:
            self._check_token_ids("label_calibration.label_token_ids", label_ids, source)
        if self.optimizer not in ("momentum", "ema"):
            raise AdapterFormatError(
                f"{source}: optimizer must be 'momentum' or 'ema', found {self.optimizer!r}")
        if self.position_mode not in ("published", "aligned"):
            raise AdapterFormatError(
                f"{source}: position_mode must be 'published' or 'aligned', "
                f"found {self.position_mode!r}")

    def _check_token_ids(self, name: str, ids: Any, source: str) -> None:
        """Every token id of a config enters prompts (vLLM decodes them as list[int] in
        the engine core, where a float or bool kills the input thread): each must be an
        int, not bool, in [0, fingerprint.vocab_size)."""
        vocab = self.fingerprint.vocab_size
        if not isinstance(ids, list):
            raise AdapterFormatError(
                f"{source}: {name} must be a list of token ids, found {describe(ids)}. "
                f"Rebuild or import the adapter again.")
        for i, token in enumerate(ids):
            if type(token) is not int or not 0 <= token < vocab:
                raise AdapterFormatError(
                    f"{source}: {name}[{i}] must be a token id, an integer in [0, "
                    f"vocab_size={vocab}), found {describe(token)}. Rebuild or import the "
                    f"adapter again.")

    def _check_imported(self, source: str) -> None:
        method = self.method
        set_fields = [name for name in DEEPTHINK_FIELDS if getattr(self, name) is not None]
        set_fields += [name for name in ("selection_trace", "selection", "label_calibration")
                       if getattr(self, name)
                       and not (name == "label_calibration" and method == COMPRESSED)]
        if set_fields:
            raise AdapterFormatError(
                f"{source}: {set_fields} are Deep-Thinking fields; a {method!r} adapter must "
                f"leave them null. Import the adapter again.")
        virtual = self.num_virtual_tokens
        specials = self.prefix_special_ids
        if type(virtual) is not int or virtual < 0:
            raise AdapterFormatError(
                f"{source}: method {method!r} needs num_virtual_tokens, a non-negative "
                f"integer; found {describe(virtual)}. Import the adapter again.")
        self._check_token_ids("prefix_special_ids", specials, source)
        if virtual + len(specials) != self.prefix_len:
            raise AdapterFormatError(
                f"{source}: num_virtual_tokens ({virtual}) + len(prefix_special_ids) "
                f"({len(specials)}) must equal prefix_len ({self.prefix_len}). Import the "
                f"adapter again.")
        files = self.provenance.get("files") if isinstance(self.provenance, dict) else None
        if (not isinstance(files, dict) or not files
                or not all(isinstance(d, str) and SHA256_HEX.fullmatch(d) for d in files.values())):
            raise AdapterFormatError(
                f"{source}: method {method!r} needs provenance.files, {{source file: sha256}} "
                f"of what it was imported from; found {files!r}. Import the adapter again.")
        if method.startswith("peft-"):
            absent = [k for k in ("peft_version", "peft_type") if k not in self.provenance]
            if absent:
                raise AdapterFormatError(
                    f"{source}: a {method!r} adapter records {absent} in its provenance; "
                    f"found none. Import the adapter again.")
        if method == "peft-multitask-prompt-tuning" and type(
                self.provenance.get("task_id")) is not int:
            raise AdapterFormatError(
                f"{source}: a multitask prompt-tuning adapter serves one task: "
                f"provenance.task_id must be an integer, found "
                f"{self.provenance.get('task_id')!r}. Import it again with a task id "
                f"(`vllm-deepthink import peft --task-id N`).")


_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def config_data_digest(data: dict[str, Any]) -> str:
    """sha256 of a config dict's canonical JSON (the weights header holds the one of the
    config as written, before any upgrade)."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def upgrade_config_data(data: Any, source: str = "config") -> dict[str, Any]:
    """A config dict of a readable format version as the current version's dict.

    format_version 1 (Deep-Thinking only, no method) becomes method "deepthink" with
    empty provenance; its fields are unchanged. Other versions are refused.
    """
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{source}: expected a JSON object, found {type(data).__name__}")
    version = data.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS or type(version) is not int:
        raise AdapterFormatError(
            f"{source}: format_version {version!r} is not supported; this vllm-deepthink "
            f"reads format_version {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}. "
            f"Rebuild the adapter with `vllm-deepthink build` (or import it again) or "
            f"install the vllm-deepthink that wrote it.")
    if version == 1:
        if "method" in data:
            raise AdapterFormatError(
                f"{source}: format_version 1 has no 'method' key, found one; the file was "
                f"edited by hand. Rebuild the adapter.")
        data = {**data, "method": DEEPTHINK, "format_version": FORMAT_VERSION}
    return data


def load_config(directory: str | Path) -> DeepThinkConfig:
    """The validated config of an adapter directory (upgraded to the current version)."""
    return load_config_and_digest(directory)[0]


def load_config_and_digest(directory: str | Path) -> tuple[DeepThinkConfig, str]:
    """(config, digest of the config as written): the weights header holds the latter,
    which differs from `config.digest()` for a config upgraded from an older version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(
            f"{directory}: no such adapter directory; expected a directory holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (build one with `vllm-deepthink build`).")
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = (" It looks like a PEFT/LoRA adapter, not a vllm-deepthink adapter: import a "
                "PEFT prefix/prompt-tuning adapter with `vllm-deepthink import peft "
                f"{directory} --model BASE --out DIR` (LoRA is served by vLLM's own "
                "--enable-lora)."
                if (directory / "adapter_config.json").exists() else "")
        raise AdapterFormatError(
            f"{directory}: {CONFIG_NAME} is missing; expected a vllm-deepthink adapter "
            f"directory.{hint} Build one with `vllm-deepthink build`.")
    data = read_json(path, ". Rebuild the adapter.")
    try:
        config = DeepThinkConfig.from_dict(data, str(path))
        # Unknown keys are ignored (with a warning) by the digest as by the config.
        known = {f.name for f in dataclasses.fields(DeepThinkConfig)}
        return config, config_data_digest({k: v for k, v in data.items() if k in known})
    except RecursionError:  # parsed near the interpreter's limit, too deep to hash
        raise AdapterFormatError(f"{path}: nested too deeply to read. Rebuild the "
                                 f"adapter.") from None


def check_fingerprint(config: DeepThinkConfig, expected: ModelFingerprint, source: str) -> None:
    diffs = config.fingerprint.mismatches(expected)
    if diffs:
        raise AdapterFormatError(
            f"{source}: adapter was built for a different base model "
            f"({config.base_model_name_or_path}); fingerprint fields differ: "
            + "; ".join(diffs)
            + ". Serve it with the model it was built on, or rebuild it on this model.")
