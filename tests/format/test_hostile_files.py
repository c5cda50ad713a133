"""Issue 32, items 1 and 2: an adapter directory is input. Every hostile config or weights
file is an AdapterFormatError naming the field (never a TypeError, ValueError or
RecursionError, never a hang), and the checks run cheapest first: the config, the
fingerprint against the model, the weights file's size, and only then the tensors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.hostile_adapters import CASES, make_hostile, resign
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import (CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError,
                                   DeepThinkAdapter, DeepThinkConfig, ModelFingerprint)
from vllm_deepthink.format import adapter as adapter_module
from vllm_deepthink.format.errors import MAX_JSON_BYTES, read_json


@pytest.fixture(scope="module")
def base_files(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    adapter = noisy_adapter(model, tokenizer, root / "good", 24, seed=3)
    return root, model, adapter


@pytest.fixture(scope="module")
def hostile(base_files):
    root, *_ = base_files
    return make_hostile(root / "good", root / "hostile")


@pytest.fixture
def good(base_files, tmp_path):
    return shutil.copytree(base_files[0] / "good", tmp_path / "good")


@pytest.mark.parametrize("case", list(CASES))
def test_each_hostile_adapter_is_refused_naming_the_field(hostile, case):
    """Before the fix: float / bool / negative / out-of-vocab ids and a non-dict
    optimizer_params loaded (float ids then hung the engine core); num_layers "x" raised
    TypeError, a 5000-digit integer ValueError, 100k-deep JSON RecursionError, a list
    method TypeError; a weights file of the wrong size was read whole first."""
    with pytest.raises(AdapterFormatError) as info:
        DeepThinkAdapter.from_pretrained(hostile[case])
    assert CASES[case][1] in str(info.value)


def test_the_hostile_copies_differ_only_where_intended(base_files, hostile):
    """The re-signed cases pass every check but their own: the good adapter, re-signed
    the same way, loads."""
    root, _, adapter = base_files
    again = shutil.copytree(root / "good", root / "resigned")
    resign(again)
    assert DeepThinkAdapter.from_pretrained(again).config == adapter.config


def test_token_ids_of_imported_methods_are_checked_against_the_vocabulary(base_files, tmp_path):
    _, _, adapter = base_files
    fp = adapter.config.fingerprint
    config = DeepThinkConfig(
        base_model_name_or_path="tiny", fingerprint=fp, prefix_len=adapter.prefix_len,
        dtype="float32", method="past-kv", num_virtual_tokens=adapter.prefix_len - 1,
        prefix_special_ids=[1], provenance={"source": "past-kv", "files": {"kv": "0" * 64}})
    imported = DeepThinkAdapter(config=config, keys=adapter.keys, values=adapter.values)
    directory = imported.save_pretrained(tmp_path / "imported")
    assert DeepThinkAdapter.from_pretrained(directory).config.prefix_special_ids == [1]
    data = json.loads((directory / CONFIG_NAME).read_text())
    data["prefix_special_ids"] = [fp.vocab_size]
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    resign(directory)
    expected = (r"prefix_special_ids\[0\] must be a token id, an integer in "
                rf"\[0, vocab_size={fp.vocab_size}\)")
    with pytest.raises(AdapterFormatError, match=expected):
        DeepThinkAdapter.from_pretrained(directory)


def test_the_message_says_what_was_expected_and_found(hostile):
    with pytest.raises(AdapterFormatError, match=r"demo_token_ids\[0\] must be a token id, an "
                                                 r"integer in \[0, vocab_size=\d+\), found 5.0 "
                                                 r"\(float\)"):
        DeepThinkAdapter.from_pretrained(hostile["float-demo-id"])
    with pytest.raises(AdapterFormatError, match=r"fingerprint.num_layers must be an integer in "
                                                 r"\[1, 4096\], found 'x' \(str\)"):
        DeepThinkAdapter.from_pretrained(hostile["str-num-layers"])
    with pytest.raises(AdapterFormatError, match="found an integer of about 399. digits"):
        DeepThinkAdapter.from_pretrained(hostile["4000-digit-vocab"])


def test_the_fingerprint_is_compared_before_the_weights_are_read(base_files, good):
    """A corrupt weights file of an adapter for another model: the fingerprint answers
    (before the fix: the weights were read and parsed first)."""
    _, _, adapter = base_files
    other = dataclasses.replace(adapter.config.fingerprint, embedding_sha256="f" * 64)
    (good / WEIGHTS_NAME).write_bytes(b"\0" * 10)
    with pytest.raises(AdapterFormatError, match="different base model.*embedding_sha256"):
        DeepThinkAdapter.from_pretrained(good, expected_fingerprint=other)


def test_a_weights_file_of_the_wrong_size_is_never_read(good, monkeypatch):
    """More layers in the config than in the file: refused from the file's size, before
    any tensor data is read (before the fix: every tensor was read, then a set of
    range(num_layers) names was built)."""
    data = json.loads((good / CONFIG_NAME).read_text())
    data["fingerprint"]["num_layers"] = 4096
    (good / CONFIG_NAME).write_text(json.dumps(data))
    resign(good)
    reads = []
    monkeypatch.setattr(adapter_module, "safetensors_load",
                        lambda data: reads.append(len(data)))
    with pytest.raises(AdapterFormatError, match=r"bytes, but the config implies 8 \+ \d+ .* \+ "
                                                 r"\d+ \(num_layers \* 2 tensors"):
        DeepThinkAdapter.from_pretrained(good)
    assert reads == []


def test_the_weights_file_size_is_exact(base_files, good):
    _, _, adapter = base_files
    size = (good / WEIGHTS_NAME).stat().st_size
    header = int.from_bytes((good / WEIGHTS_NAME).read_bytes()[:8], "little")
    assert size == 8 + header + adapter.config.kv_bytes()
    assert adapter.config.kv_bytes() == sum(t.numel() * t.element_size()
                                            for t in (*adapter.keys, *adapter.values))


def test_the_weights_file_is_opened_once(good, monkeypatch):
    """The header is parsed from the bytes the tensors are loaded from (before the fix a
    second open read the header: a file swapped in between went unnoticed)."""
    import builtins
    import io

    opened = []

    def counting(real):
        def wrapper(file, *args, **kwargs):
            if str(file).endswith(WEIGHTS_NAME):
                opened.append(real)
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(io, "open", counting(io.open))  # pathlib's read_bytes
    if hasattr(adapter_module, "safe_open"):  # safetensors opens in Rust
        monkeypatch.setattr(adapter_module, "safe_open", counting(adapter_module.safe_open))
    DeepThinkAdapter.from_pretrained(good)
    assert len(opened) == 1


def test_a_config_over_the_size_cap_is_not_parsed(good, monkeypatch):
    """A valid config padded past the cap (whitespace leaves its digest unchanged: before
    the fix it loaded, after parsing every byte)."""
    path = good / CONFIG_NAME
    path.write_text(path.read_text() + " " * MAX_JSON_BYTES)
    parsed = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1))
    with pytest.raises(AdapterFormatError, match=f"more than the {MAX_JSON_BYTES} bytes"):
        DeepThinkAdapter.from_pretrained(good)
    assert parsed == []


@pytest.mark.parametrize("content,fragment", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"9" * 5000, "more than 4300 digits"),
    (b"{", "not valid JSON"),
])
def test_read_json_maps_every_parse_failure(tmp_path, content, fragment):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(AdapterFormatError, match=fragment) as info:
        read_json(path, ". Fix it.")
    assert str(info.value).startswith(str(path)) and str(info.value).endswith(". Fix it.")


def test_fingerprint_fields_keep_their_python_values(base_files):
    """The checks accept what from_model writes (ints, strings, a rope dict)."""
    _, model, adapter = base_files
    fp = ModelFingerprint.from_model(model)
    assert ModelFingerprint.from_dict(fp.to_dict()) == fp == adapter.config.fingerprint
    with pytest.raises(AdapterFormatError, match="fingerprint.num_kv_heads must be an integer"):
        ModelFingerprint.from_dict({**fp.to_dict(), "num_kv_heads": True})
    with pytest.raises(AdapterFormatError, match="fingerprint.embedding_sha256 must be 64"):
        ModelFingerprint.from_dict({**fp.to_dict(), "embedding_sha256": "x" * 64})



def test_json_parsed_near_the_recursion_limit_is_refused_when_hashed(good, monkeypatch):
    """JSON the parser could nest (just under the limit) can still be too deep for the
    digest, which runs deeper in the stack: an AdapterFormatError, not a RecursionError
    (simulated: where exactly the limit falls depends on the caller's stack)."""
    from vllm_deepthink.format import config as config_module

    def too_deep(data):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(config_module, "config_data_digest", too_deep)
    with pytest.raises(AdapterFormatError, match="nested too deeply to read"):
        DeepThinkAdapter.from_pretrained(good)
