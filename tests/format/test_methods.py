"""Format version 2: the method field, per-method validation, placeholder ids, provenance,
format_version 1 adapters upgraded on read, and format_version 2 adapters written before
the later optional fields (selection, label_calibration, compression) still load."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from tests.helpers.adapter_factory import (V1_KEYS, V2_FIRST_KEYS, noisy_adapter,
                                          write_first_v2_adapter, write_v1_adapter)
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import (CONFIG_NAME, FORMAT_VERSION, METHODS, PLACEHOLDER_TOKEN_ID,
                                    WEIGHTS_NAME, AdapterFormatError, DeepThinkAdapter,
                                    DeepThinkConfig, ModelFingerprint, load_config)

SHA = "ab" * 32


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return tiny_llama_dir, model, tokenizer


@pytest.fixture(scope="module")
def deepthink(llama, tmp_path_factory):
    _, model, tokenizer = llama
    return noisy_adapter(model, tokenizer, tmp_path_factory.mktemp("dt") / "a", 12, seed=3)


def imported(model, method="peft-prefix-tuning", virtual=5, specials=(1,), **provenance):
    """An imported-method adapter: random K/V of virtual + len(specials) positions."""
    fingerprint = ModelFingerprint.from_model(model)
    length = virtual + len(specials)
    generator = torch.Generator().manual_seed(0)
    shape = (fingerprint.num_kv_heads, length, fingerprint.head_dim)
    keys = [torch.randn(shape, generator=generator) for _ in range(fingerprint.num_layers)]
    values = [torch.randn(shape, generator=generator) for _ in range(fingerprint.num_layers)]
    record = {"source": "peft", "files": {"adapter_model.safetensors": SHA},
              "peft_version": "0.21.2", "peft_type": "PREFIX_TUNING", **provenance}
    config = DeepThinkConfig(base_model_name_or_path="tiny", fingerprint=fingerprint,
                             prefix_len=length, dtype="float32", method=method,
                             num_virtual_tokens=virtual, prefix_special_ids=list(specials),
                             provenance=record)
    return DeepThinkAdapter(config=config, keys=keys, values=values)


def edit(directory, change):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def resave_with_header(adapter, directory, change):
    """Edit the config and write weights whose header matches the edited config, so
    only the config's own validation can refuse it."""
    from safetensors.torch import save

    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    tensors = {f"layers.{i}.{kind}": t for i, (k, v) in enumerate(zip(adapter.keys, adapter.values))
               for kind, t in (("key", k), ("value", v))}
    (directory / WEIGHTS_NAME).write_bytes(save(tensors, metadata={
        "deepthink_config_sha256": hashlib.sha256(canonical.encode()).hexdigest()}))


def test_format_version_is_2_and_deepthink_is_the_default_method(deepthink):
    assert FORMAT_VERSION == 2
    assert deepthink.config.method == "deepthink" and deepthink.config.format_version == 2
    assert deepthink.config.placeholder_token_ids() == deepthink.config.demo_token_ids
    assert deepthink.config.provenance == {} and deepthink.config.num_virtual_tokens is None


def test_v1_adapter_written_by_the_old_code_loads_upgraded(deepthink, llama, tmp_path):
    directory = write_v1_adapter(deepthink, tmp_path / "v1")
    written = json.loads((directory / CONFIG_NAME).read_text())
    assert written["format_version"] == 1 and set(written) == set(V1_KEYS)
    loaded = DeepThinkAdapter.from_pretrained(
        directory, expected_fingerprint=ModelFingerprint.from_checkpoint(llama[0]))
    assert loaded.config.method == "deepthink" and loaded.config.format_version == 2
    assert loaded.config == deepthink.config  # every v1 field unchanged
    assert loaded.config.placeholder_token_ids() == deepthink.config.demo_token_ids
    assert loaded.digest == hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    for a, b in zip(loaded.keys + loaded.values, deepthink.keys + deepthink.values):
        assert torch.equal(a, b)
    # Saving it again writes format_version 2, which loads as is.
    loaded.save_pretrained(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / CONFIG_NAME).read_text())["format_version"] == 2
    assert DeepThinkAdapter.from_pretrained(tmp_path / "v2").config == deepthink.config


@pytest.mark.parametrize("method", ["deepthink", "past-kv"])
def test_first_v2_adapter_without_the_later_fields_loads(deepthink, llama, tmp_path, method):
    adapter = deepthink if method == "deepthink" else imported(
        llama[1], method="past-kv", virtual=7, specials=(),
        source="past-kv", files={"cache.safetensors": SHA})
    directory = write_first_v2_adapter(adapter, tmp_path / "v2")
    written = json.loads((directory / CONFIG_NAME).read_text())
    assert written["format_version"] == 2 and set(written) == set(V2_FIRST_KEYS)
    assert not {"selection", "label_calibration", "compression"} & set(written)
    loaded = DeepThinkAdapter.from_pretrained(
        directory, expected_fingerprint=ModelFingerprint.from_checkpoint(llama[0]))
    assert loaded.config == adapter.config  # the later fields at their defaults
    assert loaded.config.compression is None and loaded.config.method == method
    assert loaded.digest == hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    for a, b in zip(loaded.keys + loaded.values, adapter.keys + adapter.values):
        assert torch.equal(a, b)


def test_v1_config_edited_apart_from_its_weights_is_refused(deepthink, tmp_path):
    directory = write_v1_adapter(deepthink, tmp_path / "v1")
    edit(directory, lambda d: d.update(selected_iteration=2))
    with pytest.raises(AdapterFormatError, match="config was edited or belongs to other weights"):
        DeepThinkAdapter.from_pretrained(directory)


def test_v1_config_with_a_method_key_is_refused(deepthink, tmp_path):
    directory = write_v1_adapter(deepthink, tmp_path / "v1")
    edit(directory, lambda d: d.update(method="past-kv"))
    with pytest.raises(AdapterFormatError, match="format_version 1 has no 'method' key"):
        load_config(directory)


def test_imported_method_round_trip_and_placeholders(llama, tmp_path):
    adapter = imported(llama[1], virtual=5, specials=(1,))
    adapter.save_pretrained(tmp_path / "p")
    loaded = DeepThinkAdapter.from_pretrained(tmp_path / "p")
    assert loaded.config == adapter.config and loaded.config.method == "peft-prefix-tuning"
    # Virtual positions get the fixed id, the baked-in BOS its real id, at the end.
    assert loaded.config.placeholder_token_ids() == [PLACEHOLDER_TOKEN_ID] * 5 + [1]
    assert loaded.config.demo_token_ids is None and loaded.config.optimizer is None
    past_kv = imported(llama[1], method="past-kv", virtual=7, specials=())
    assert past_kv.config.placeholder_token_ids() == [PLACEHOLDER_TOKEN_ID] * 7
    assert set(METHODS) >= {"deepthink", "peft-prefix-tuning", "peft-prompt-tuning",
                            "peft-p-tuning", "past-kv"}


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(method="lora"), "method 'lora' is unknown"),
    (lambda d: d.update(demos_text="x"), r"\['demos_text'\] are Deep-Thinking fields"),
    (lambda d: d.update(selection_trace=[{"iteration": 1}]), "selection_trace"),
    (lambda d: d.update(num_virtual_tokens=None), "needs num_virtual_tokens"),
    (lambda d: d.update(num_virtual_tokens=4), r"num_virtual_tokens \(4\) \+ len\(prefix_special_ids\) "
                                               r"\(1\) must equal prefix_len \(6\)"),
    (lambda d: d.update(prefix_special_ids=["x"]), r"prefix_special_ids\[0\] must be a token id"),
    (lambda d: d["provenance"].pop("files"), "needs provenance.files"),
    (lambda d: d["provenance"].update(files={"a": "not-a-digest"}), "needs provenance.files"),
    (lambda d: d["provenance"].pop("peft_version"), r"records \['peft_version'\]"),
    (lambda d: d.update(method="peft-multitask-prompt-tuning"), "task_id must be an integer"),
])
def test_imported_method_validation(llama, tmp_path, change, message):
    adapter = imported(llama[1])
    adapter.save_pretrained(tmp_path / "p")
    resave_with_header(adapter, tmp_path / "p", change)
    with pytest.raises(AdapterFormatError, match=message):
        DeepThinkAdapter.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(demo_token_ids=None), r"method 'deepthink' needs \['demo_token_ids'\]"),
    (lambda d: d.update(optimizer=None), r"needs \['optimizer'\]"),
    (lambda d: d.update(num_virtual_tokens=3), "belong to imported methods"),
])
def test_deepthink_validation(deepthink, tmp_path, change, message):
    deepthink.save_pretrained(tmp_path / "d")
    resave_with_header(deepthink, tmp_path / "d", change)
    with pytest.raises(AdapterFormatError, match=message):
        DeepThinkAdapter.from_pretrained(tmp_path / "d")


def test_save_refuses_an_invalid_method_config(llama, tmp_path):
    adapter = imported(llama[1])
    bad = dataclasses.replace(adapter.config, num_virtual_tokens=2)
    with pytest.raises(AdapterFormatError, match="must equal prefix_len"):
        DeepThinkConfig.from_dict(bad.to_dict(), "config")


def test_peft_directory_points_at_the_importer(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="vllm-deepthink import peft"):
        load_config(tmp_path)
