"""Hostile adapter directories (issue 32): a valid adapter with one field or file made
hostile. Where the hostile config can still be hashed, the weights are re-signed with its
digest, so that only the check under test can refuse it (before the fix, a re-signed
adapter with float demo ids loaded and hung the engine).

`make_hostile(source, out)` writes every case as `out/<case>`; `CASES` maps each case to
a fragment the refusal's message must contain (the field, or what is wrong).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from vllm_deepthink.format.config import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    DeepThinkConfig,
    config_data_digest,
)


def resign(directory: Path) -> None:
    """Rewrite the weights' header digest to the one of the config as written."""
    data = json.loads((directory / CONFIG_NAME).read_text())
    known = {f.name for f in dataclasses.fields(DeepThinkConfig)}
    digest = config_data_digest({k: v for k, v in data.items() if k in known})
    weights = directory / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = safetensors_load(weights.read_bytes())
    weights.write_bytes(safetensors_save(tensors, metadata={**metadata,
                                                            CONFIG_DIGEST_KEY: digest}))


def _config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A case editing the parsed config, then re-signing the weights."""
    def apply(directory: Path) -> None:
        path = directory / CONFIG_NAME
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        resign(directory)
    return apply


def _config_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    """A case editing the config's text (JSON that cannot be hashed: not re-signed)."""
    def apply(directory: Path) -> None:
        path = directory / CONFIG_NAME
        path.write_text(edit(path.read_text()))
    return apply


def _weights(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / WEIGHTS_NAME
        path.write_bytes(edit(path.read_bytes()))
    return apply


def _set(key: str, value: Any, index: int | None = None) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = key.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        if index is None:
            target[last] = value
        else:
            target[last][index] = value
    return edit


def _vocab_size(data: dict) -> None:
    data["demo_token_ids"][0] = data["fingerprint"]["vocab_size"]


def _fingerprint_text(field: str, literal: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = json.loads(text)
        data["fingerprint"][field] = "@@"
        return json.dumps(data).replace('"@@"', literal)
    return edit


# case -> (how it is made, a fragment of the refusal's message)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "float-demo-id": (_config(_set("demo_token_ids", 5.0, 0)), "demo_token_ids[0]"),
    "bool-demo-id": (_config(_set("demo_token_ids", True, 1)), "demo_token_ids[1]"),
    "negative-demo-id": (_config(_set("demo_token_ids", -1, 2)), "demo_token_ids[2]"),
    "out-of-vocab-demo-id": (_config(_vocab_size), "demo_token_ids[0]"),
    "float-label-id": (_config(_set("label_calibration", {
        "label_words": ["a"], "label_token_ids": [1.5]})),
        "label_calibration.label_token_ids[0]"),
    "huge-num-layers": (_config(_set("fingerprint.num_layers", 10 ** 9)),
                        "fingerprint.num_layers"),
    "str-num-layers": (_config(_set("fingerprint.num_layers", "x")), "fingerprint.num_layers"),
    "float-head-dim": (_config(_set("fingerprint.head_dim", 64.0)), "fingerprint.head_dim"),
    "4000-digit-vocab": (_config(_set("fingerprint.vocab_size", 10 ** 3999)),
                         "fingerprint.vocab_size"),
    "int-architecture": (_config(_set("fingerprint.architecture", 5)),
                         "fingerprint.architecture"),
    "list-method": (_config(_set("method", ["deepthink"])), "method must be a string"),
    "str-optimizer-params": (_config(_set("optimizer_params", "x")), "optimizer_params"),
    "5000-digit-int": (_config_text(_fingerprint_text("num_layers", "9" * 5000)),
                       "4300 digits"),
    "100k-deep-json": (_config_text(lambda text: text[:-2] + ', "task": '
                                    + "[" * 100_000 + "]" * 100_000 + "}"),
                       "nested too deeply"),
    "short-weights": (_weights(lambda data: data[:-4]), "the config implies"),
    "long-weights": (_weights(lambda data: data + b"\0" * 4), "the config implies"),
    "huge-header-length": (_weights(lambda data: (1 << 62).to_bytes(8, "little") + data[8:]),
                           "the config implies"),
}


def make_hostile(source: Path, out: Path, cases: dict = CASES) -> dict[str, Path]:
    """Write each case as a copy of the adapter at `source` under `out`; {case: dir}."""
    made = {}
    for case, (apply, _) in cases.items():
        directory = out / case
        shutil.copytree(source, directory)
        apply(directory)
        made[case] = directory
    return made
