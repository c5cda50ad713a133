"""Raw per-layer K/V (past_key_values) from safetensors: both layouts, exact round trip,
HF parity, provenance, and every refusal with its reason."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.references import hf_reference, max_abs_diff
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import PLACEHOLDER_TOKEN_ID, DeepThinkAdapter, ModelFingerprint
from vllm_deepthink.format import hf_cache
from vllm_deepthink.producers.kv_import import ImportRefusedError
from vllm_deepthink.producers.past_kv import import_past_kv

QUERY = "Question: who wrote Hamlet ?\nType:"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request):
    directory = request.getfixturevalue(f"tiny_{request.param}_dir")
    model, tokenizer = load_tiny(request.param, directory)
    return directory, model, tokenizer


def cache_kv(model, tokenizer, length=20, noise=0.3):
    """HF cache of `length` corpus tokens (BOS first), perturbed: per layer
    [1, kv_heads, L, D] tensors, like a trained KV cache."""
    ids = tokenizer("Review: a charming film\nSentiment: positive\n\nReview: dull",
                    add_special_tokens=True)["input_ids"][:length]
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    generator = torch.Generator().manual_seed(0)
    out = {}
    for i, layer in enumerate(cache.layers):
        for kind, t in (("key", layer.keys), ("value", layer.values)):
            out[f"layers.{i}.{kind}"] = (t + noise * t.std() * torch.randn(
                t.shape, generator=generator)).contiguous()
    return out


def test_hf_cache_layout_round_trip_and_parity(family, tmp_path):
    model_dir, model, tokenizer = family
    tensors = cache_kv(model, tokenizer)
    path = tmp_path / "cache.safetensors"
    save_file(tensors, str(path), metadata={"producer": "test", "note": "trained cache"})
    adapter = import_past_kv(path, model_dir)
    length = tensors["layers.0.key"].shape[2]
    config = adapter.config
    assert (config.method, config.prefix_len, config.num_virtual_tokens) == ("past-kv", length,
                                                                           length)
    assert config.placeholder_token_ids() == [PLACEHOLDER_TOKEN_ID] * length
    assert config.provenance["files"] == {
        "cache.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert config.provenance["layout"] == "[1, num_kv_heads, L, head_dim]"
    assert config.provenance["metadata"] == {"producer": "test", "note": "trained cache"}
    num_layers = config.fingerprint.num_layers
    for i in range(num_layers):  # stored exactly
        assert torch.equal(adapter.keys[i], tensors[f"layers.{i}.key"][0])
        assert torch.equal(adapter.values[i], tensors[f"layers.{i}.value"][0])
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = DeepThinkAdapter.from_pretrained(
        tmp_path / "adapter", expected_fingerprint=ModelFingerprint.from_checkpoint(model_dir))
    # HF with the file's past_key_values == HF with the adapter (what the server matches).
    query = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    cache = hf_cache.cache_from_kv(
        [(tensors[f"layers.{i}.key"], tensors[f"layers.{i}.value"]) for i in range(num_layers)],
        model.config)
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.tensor([query]), past_key_values=cache).logits[0], -1)
    expected = [direct[j - 1, query[j]].item() for j in range(1, len(query))]
    served = hf_reference(model, loaded, query, num_greedy=0)
    assert max_abs_diff(served.prompt_logprobs, expected) == 0.0
    assert max_abs_diff(served.prompt_logprobs,
                        hf_reference(model, None, query, num_greedy=0).prompt_logprobs) > 0.05


def test_three_dim_layout_and_dtypes(family, tmp_path):
    model_dir, model, tokenizer = family
    tensors = {k: v[0].to(torch.bfloat16).contiguous()
               for k, v in cache_kv(model, tokenizer).items()}
    save_file(tensors, str(tmp_path / "kv.safetensors"))
    adapter = import_past_kv(tmp_path / "kv.safetensors", model_dir)
    assert adapter.config.dtype == "bfloat16"
    assert adapter.config.provenance["layout"] == "[num_kv_heads, L, head_dim]"
    as_fp32 = import_past_kv(tmp_path / "kv.safetensors", model_dir, dtype="float32")
    assert as_fp32.keys[0].dtype == torch.float32
    assert torch.equal(as_fp32.keys[0], tensors["layers.0.key"].float())


def test_an_adapter_weights_file_is_a_past_kv_file(family, tmp_path):
    from tests.helpers.adapter_factory import noisy_adapter

    model_dir, model, tokenizer = family
    built = noisy_adapter(model, tokenizer, tmp_path / "dt", 12)
    imported = import_past_kv(tmp_path / "dt" / "deepthink_model.safetensors", model_dir)
    assert all(torch.equal(a, b) for a, b in zip(imported.keys + imported.values,
                                                  built.keys + built.values))


def write(tmp_path, tensors, name="kv.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("case", ["layers", "heads", "head_dim", "nan", "inf", "lengths",
                                  "extra", "batch", "float64", "mixed", "too_long"])
def test_wrong_input_is_refused(family, tmp_path, case):
    model_dir, model, tokenizer = family
    fp = ModelFingerprint.from_checkpoint(model_dir)
    n, heads, dim = fp.num_layers, fp.num_kv_heads, fp.head_dim
    good = {k: v[0] for k, v in cache_kv(model, tokenizer).items()}
    L = good["layers.0.key"].shape[1]
    bad = dict(good)
    if case == "layers":
        bad = {k: v for k, v in good.items() if not k.startswith(f"layers.{n - 1}.")}
        message = (rf"expected layers.0..{n - 1}.key/value for the model's {n} layers; found "
                   rf"K/V of {n - 1} layers .*missing \['layers.{n - 1}.key'")
    elif case == "heads":
        bad = {k: torch.cat([v, v], 0) for k, v in good.items()}
        message = (rf"layer 0 key has shape \({2 * heads}, {L}, {dim}\); expected \[num_kv_heads, "
                   rf"L, head_dim\] = \[{heads}, {L}, {dim}\]")
    elif case == "head_dim":
        bad = {k: v[..., :32] for k, v in good.items()}
        message = rf"shape \({heads}, {L}, 32\); expected .*\[{heads}, {L}, {dim}\]"
    elif case in ("nan", "inf"):
        bad["layers.1.value"] = good["layers.1.value"].clone()
        bad["layers.1.value"][0, 0, 0] = float(case)
        message = "layer 1 value contains NaN or Inf"
    elif case == "lengths":
        bad["layers.1.key"] = good["layers.1.key"][:, :-1]
        message = rf"layer 1 key has shape \({heads}, {L - 1}, {dim}\).*one L for every tensor"
    elif case == "extra":
        bad["lm_head.weight"] = torch.zeros(2, 2)
        message = r"unexpected \['lm_head.weight'\]"
    elif case == "batch":
        bad = {k: torch.stack([v, v]) for k, v in good.items()}
        message = r"4-D tensors of batch \[2\]; expected HF's cache layout \[1, "
    elif case == "float64":
        bad = {k: v.double() for k, v in good.items()}
        message = "dtype torch.float64; adapters store float32.*`dtype` float32"
    elif case == "mixed":
        bad["layers.0.key"] = good["layers.0.key"].half()
        message = r"dtypes \['torch.float16', 'torch.float32'\]; expected one dtype"
    else:  # a prefix that fills every position of the model
        positions = 2048 if fp.model_type == "llama" else 1024
        bad = {k: v[:, :1].expand(-1, positions, -1) for k, v in good.items()}
        message = f"a prefix of {positions} positions leaves no room for a query"
    with pytest.raises(ImportRefusedError, match=message):
        import_past_kv(write(tmp_path, bad), model_dir)


def test_pickles_and_other_files_are_refused_unopened(family, tmp_path):
    model_dir = family[0]
    for suffix in (".pt", ".bin", ".pth"):
        path = tmp_path / f"cache{suffix}"
        path.write_bytes(b"never opened")
        with pytest.raises(ImportRefusedError, match=rf"a \{suffix} file is a pickle .*never "
                                                     r"loaded.*save_file"):
            import_past_kv(path, model_dir)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ImportRefusedError, match="not a readable safetensors file"):
        import_past_kv(junk, model_dir)
    with pytest.raises(ImportRefusedError, match="no such file"):
        import_past_kv(tmp_path / "missing.safetensors", model_dir)
    with pytest.raises(ImportRefusedError, match="no-model: no such model directory, and not a hub id"):
        import_past_kv(junk, tmp_path / "no-model")
