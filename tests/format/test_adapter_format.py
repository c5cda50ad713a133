"""Adapter directory format: exact round trip and every rejection, with its message."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import save as safetensors_save

from tests.helpers.tiny_models import load_tiny, make_tiny_model
from vllm_deepthink.producers.deepthink import builder
from vllm_deepthink.format import (CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError,
                                    DeepThinkAdapter)
from vllm_deepthink.format import ModelFingerprint

DEMOS = "Review: a charming film\nSentiment: positive\n\n"


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir):
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return builder.build_adapter(model, tokenizer, DEMOS, iterations=3, progress=False,
                                 task={"name": "toy", "shots_per_class": 1},
                                 build_args={"iterations": 3})


@pytest.fixture
def saved(adapter, tmp_path):
    return adapter.save_pretrained(tmp_path / "adapter")


def _edit_config(directory, edit):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _write_weights(directory, adapter, keys=None, values=None, names=None):
    """Weights file carrying the config's digest but the given tensors (and layer
    numbers `names`, default 0..n-1)."""
    keys, values = keys or adapter.keys, values or adapter.values
    names = names or range(len(keys))
    tensors = {f"layers.{i}.{kind}": t for i, k, v in zip(names, keys, values)
               for kind, t in (("key", k), ("value", v))}
    (directory / WEIGHTS_NAME).write_bytes(safetensors_save(
        tensors, metadata={"deepthink_config_sha256": adapter.config.digest()}))


def test_round_trip_is_exact(adapter, saved):
    loaded = DeepThinkAdapter.from_pretrained(saved)
    assert loaded.config.to_dict() == adapter.config.to_dict()
    assert loaded.config == adapter.config
    for mine, theirs in ((adapter.keys, loaded.keys), (adapter.values, loaded.values)):
        assert len(mine) == len(theirs) == 3
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.digest == hashlib.sha256((saved / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert loaded.digest == adapter.digest  # save_pretrained sets it too
    assert not list(saved.glob("*.tmp"))


def test_fingerprint_from_checkpoint_matches_model(adapter, tiny_llama_dir, saved):
    from_dir = ModelFingerprint.from_checkpoint(tiny_llama_dir)
    assert from_dir.mismatches(adapter.config.fingerprint) == []
    DeepThinkAdapter.from_pretrained(saved, expected_fingerprint=from_dir)  # no error


def test_a_model_loaded_in_bfloat16_has_its_checkpoints_fingerprint(tiny_llama_dir):
    """Its embeddings are rounded in memory; before, an adapter built in bfloat16 from
    a float32 checkpoint carried a digest no server of that checkpoint matched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    rounded = ModelFingerprint.from_hf_config(model.config, model.get_input_embeddings().weight)
    from_dir = ModelFingerprint.from_checkpoint(tiny_llama_dir)
    assert rounded.embedding_sha256 != from_dir.embedding_sha256
    assert ModelFingerprint.from_model(model) == from_dir


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such adapter directory"):
        DeepThinkAdapter.from_pretrained(tmp_path / "nope")


def test_missing_config_points_at_peft(saved):
    (saved / CONFIG_NAME).rename(saved / "adapter_config.json")
    with pytest.raises(AdapterFormatError, match="deepthink_config.json is missing.*PEFT/LoRA"):
        DeepThinkAdapter.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFormatError, match="deepthink_model.safetensors is missing"):
        DeepThinkAdapter.from_pretrained(saved)


def test_truncated_safetensors(saved):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterFormatError, match="bytes, but the config implies .*truncated"):
        DeepThinkAdapter.from_pretrained(saved)


def test_invalid_json(saved):
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        DeepThinkAdapter.from_pretrained(saved)


def test_wrong_shapes(adapter, saved):
    # As many bytes as the config implies (so the size check passes), the wrong shape.
    transposed = [k.transpose(1, 2).contiguous() for k in adapter.keys]
    _write_weights(saved, adapter, keys=transposed)
    L = adapter.prefix_len
    with pytest.raises(AdapterFormatError,
                       match=rf"layers.0.key has shape \(2, 64, {L}\), expected .*\[2, {L}, 64\]"):
        DeepThinkAdapter.from_pretrained(saved)


def test_missing_layer_tensor(adapter, saved):
    _write_weights(saved, adapter, names=[0, 1, 7])
    with pytest.raises(AdapterFormatError, match=r"missing \['layers.2.key', 'layers.2.value'\]"
                                                 r", unexpected \['layers.7.key'"):
        DeepThinkAdapter.from_pretrained(saved)


def test_wrong_dtype(adapter, saved):
    _write_weights(saved, adapter, values=[v.view(torch.int32) for v in adapter.values])
    with pytest.raises(AdapterFormatError, match="layers.0.value has dtype torch.int32, the "
                                                 "config says float32"):
        DeepThinkAdapter.from_pretrained(saved)


def test_nan(adapter, saved):
    values = [v.clone() for v in adapter.values]
    values[1][0, 0, 0] = float("nan")
    _write_weights(saved, adapter, values=values)
    with pytest.raises(AdapterFormatError, match="layers.1.value contains NaN or Inf"):
        DeepThinkAdapter.from_pretrained(saved)


def test_save_refuses_nan(adapter, tmp_path):
    keys = [k.clone() for k in adapter.keys]
    keys[0][0, 0, 0] = float("inf")
    bad = DeepThinkAdapter(config=adapter.config, keys=keys, values=adapter.values)
    with pytest.raises(AdapterFormatError, match="layers.0.key contains NaN or Inf"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / WEIGHTS_NAME).exists()


def test_wrong_base_model(adapter, saved, tmp_path, tiny_gpt2_dir):
    other_weights = ModelFingerprint.from_checkpoint(
        make_tiny_model("llama", tmp_path / "other", seed=1))
    with pytest.raises(AdapterFormatError, match="different base model.*embedding_sha256"):
        DeepThinkAdapter.from_pretrained(saved, expected_fingerprint=other_weights)
    gpt2 = ModelFingerprint.from_checkpoint(tiny_gpt2_dir)
    with pytest.raises(AdapterFormatError,
                       match="architecture: adapter 'LlamaForCausalLM', model 'GPT2LMHeadModel'"):
        DeepThinkAdapter.from_pretrained(saved, expected_fingerprint=gpt2)
    rope = dataclasses.replace(adapter.config.fingerprint,
                               rope={**adapter.config.fingerprint.rope, "rope_theta": 500000.0})
    with pytest.raises(AdapterFormatError, match="rope: adapter"):
        DeepThinkAdapter.from_pretrained(saved, expected_fingerprint=rope)


def test_wrong_format_version(saved):
    _edit_config(saved, lambda d: d.update(format_version=3))
    with pytest.raises(AdapterFormatError, match="format_version 3 is not supported.*reads "
                                                 "format_version 1 and 2"):
        DeepThinkAdapter.from_pretrained(saved)


def test_missing_required_key(saved):
    _edit_config(saved, lambda d: d.pop("prefix_len"))
    with pytest.raises(AdapterFormatError, match=r"missing required keys \['prefix_len'\]"):
        DeepThinkAdapter.from_pretrained(saved)


def test_missing_fingerprint_field(saved):
    _edit_config(saved, lambda d: d["fingerprint"].pop("head_dim"))
    with pytest.raises(AdapterFormatError, match="fingerprint must hold"):
        DeepThinkAdapter.from_pretrained(saved)


def test_unknown_key_warns_and_loads(adapter, saved):
    _edit_config(saved, lambda d: d.update(comment="hand-made note"))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['comment'\]"):
        loaded = DeepThinkAdapter.from_pretrained(saved)
    assert loaded.config == adapter.config


def test_known_keys_load_without_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeepThinkAdapter.from_pretrained(saved)


@pytest.mark.parametrize("edit", [
    lambda d: d.update(demos_text=d["demos_text"] + " "),
    lambda d: d.update(selected_iteration=1),
    lambda d: d["optimizer_params"].update(step_size=0.02),
])
def test_edited_config_fails_digest(saved, edit):
    _edit_config(saved, edit)
    with pytest.raises(AdapterFormatError, match="config was edited or belongs to other weights"):
        DeepThinkAdapter.from_pretrained(saved)


def test_inconsistent_config_rejected(saved):
    _edit_config(saved, lambda d: d.update(demo_token_ids=d["demo_token_ids"][:-1]))
    with pytest.raises(AdapterFormatError, match="demo_token_ids has .* ids but prefix_len"):
        DeepThinkAdapter.from_pretrained(saved)


def test_readme_transformers_usage(adapter, tiny_llama_dir, saved):
    """docs/format.md, "In plain transformers" (README.md, "From Python"): the query after
    `as_cache` equals the query after the demonstrations' own K/V recomputed as the
    prefix (iteration 1 would be ICL; here the adapter's K/V, checked against
    tests.helpers' reference), and `generate` on placeholder ids + query continues
    exactly as a step-by-step greedy decode over the same cache."""
    from tests.helpers.references import hf_reference

    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    loaded = DeepThinkAdapter.from_pretrained(saved)
    query = tokenizer("Review: a dull film\nSentiment:", add_special_tokens=False).input_ids
    ids = torch.tensor([query])
    with torch.no_grad():
        logits = model(ids, past_key_values=loaded.as_cache(model.config)).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    reference = hf_reference(model, adapter, query, num_greedy=6)
    ours = [logprobs[j - 1, query[j]].item() for j in range(1, len(query))]
    assert ours == pytest.approx(reference.prompt_logprobs, abs=1e-6)
    # generate: the cache stands for the first L input ids (the placeholders)
    full = torch.tensor([loaded.config.placeholder_token_ids() + query])
    out = model.generate(full, past_key_values=loaded.as_cache(model.config),
                         max_new_tokens=6, do_sample=False)
    assert out[0, full.shape[1]:].tolist() == reference.greedy_tokens[:6]
    # each call is a fresh cache: a forward pass grows the one it was given only
    used, fresh = loaded.as_cache(model.config), loaded.as_cache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=used)
    assert used.get_seq_length() == loaded.prefix_len + len(query)
    assert fresh.get_seq_length() == loaded.prefix_len
