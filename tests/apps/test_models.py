import json

import pytest
import torch
from safetensors import safe_open

from vllm_deepthink.tools.gguf_models import SOURCE_FILE, ModelError, convert_model, is_complete

pytestmark = pytest.mark.slow


def check_plain_fp32(directory):
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    files = list(directory.glob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert json.loads((directory / SOURCE_FILE).read_text())["dtype"] == "float32"
    return config


def top_next_tokens(directory, text, k=5):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return tok, [tok.decode(i) for i in logits.topk(k).indices]


def test_smollm2_converts_to_plain_fp32(smollm2_dir):
    config = check_plain_fp32(smollm2_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    _, top = top_next_tokens(smollm2_dir, "The capital of France is")
    assert " Paris" in top


def test_gemma3_converts_to_text_only_causal_lm(gemma3_dir):
    config = check_plain_fp32(gemma3_dir)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert (gemma3_dir / "GEMMA_TERMS.html").is_file()
    tok, top = top_next_tokens(gemma3_dir, "The capital of France is")
    # The GGUF asks for a BOS token; the saved tokenizer adds it.
    assert tok("x")["input_ids"][0] == tok.bos_token_id == config["bos_token_id"]
    assert " Paris" in top


def test_rerun_is_a_noop(smollm2_dir):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert convert_model("smollm2", smollm2_dir) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert not is_complete(tmp_path)
    with pytest.raises(ModelError, match="not a finished conversion"):
        convert_model("smollm2", tmp_path)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'llama-70b'"):
        convert_model("llama-70b", "unused")
