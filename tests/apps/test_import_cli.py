"""`vllm-deepthink import peft|past-kv`: the thin CLI over the importers (no engine)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

peft = pytest.importorskip("peft")

from tests.helpers.peft_adapters import make_peft_adapter  # noqa: E402
from vllm_deepthink.apps import cli  # noqa: E402
from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint  # noqa: E402


def test_help_lists_both_sources(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["import", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "peft" in text and "past-kv" in text and "layers.{i}.key" in text


def test_import_peft_writes_an_adapter_and_a_summary(tiny_llama_dir, tmp_path, capsys):
    source = make_peft_adapter(tiny_llama_dir, "prefix-proj", tmp_path / "peft",
                               num_virtual_tokens=4)
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    assert cli.main(["import", "peft", str(source), "--model", str(tiny_llama_dir),
                     "--out", str(out), "--output-json", str(summary)]) == 0
    data = json.loads(summary.read_text())
    adapter = DeepThinkAdapter.from_pretrained(
        out, expected_fingerprint=ModelFingerprint.from_checkpoint(tiny_llama_dir))
    assert data["method"] == adapter.config.method == "peft-prefix-tuning"
    assert data["prefix_len"] == 5 and data["num_virtual_tokens"] == 4
    assert data["prefix_special_ids"] == [0] and data["digest"] == adapter.digest
    assert data["provenance"]["peft_type"] == "PREFIX_TUNING" and data["out"] == str(out)
    assert adapter.config.build_args["query_special_tokens"] == "auto"
    assert "peft-prefix-tuning: 4 virtual positions + special ids [0]" in capsys.readouterr().err


def test_import_peft_flags(tiny_llama_dir, tmp_path):
    source = make_peft_adapter(tiny_llama_dir, "multitask", tmp_path / "mpt", num_virtual_tokens=3)
    out = tmp_path / "out"
    assert cli.main(["import", "peft", str(source), "--model", str(tiny_llama_dir),
                     "--out", str(out), "--task-id", "2", "--query-special-tokens", "none",
                     "--dtype", "bfloat16"]) == 0
    config = DeepThinkAdapter.from_pretrained(out).config
    assert (config.prefix_len, config.dtype, config.provenance["task_id"]) == (3, "bfloat16", 2)


def test_import_peft_refusal_is_a_clear_exit(tiny_llama_dir, tmp_path):
    source = make_peft_adapter(tiny_llama_dir, "prompt", tmp_path / "prompt")
    (source / "adapter_model.safetensors").unlink()
    (source / "adapter_model.bin").write_bytes(b"never opened")
    with pytest.raises(SystemExit) as info:
        cli.main(["import", "peft", str(source), "--model", str(tiny_llama_dir), "--out",
                  str(tmp_path / "out")])
    assert str(info.value).startswith("vllm-deepthink import peft: error: ")
    assert "adapter_model.bin, a pickle" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_import_past_kv(tiny_llama_dir, tmp_path):
    fp = ModelFingerprint.from_checkpoint(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.{kind}": torch.randn(1, fp.num_kv_heads, 9, fp.head_dim,
                                                 generator=generator)
               for i in range(fp.num_layers) for kind in ("key", "value")}
    save_file(tensors, str(tmp_path / "kv.safetensors"))
    out, summary = tmp_path / "out", tmp_path / "s.json"
    assert cli.main(["import", "past-kv", str(tmp_path / "kv.safetensors"), "--model",
                     str(tiny_llama_dir), "--out", str(out), "--output-json", str(summary)]) == 0
    data = json.loads(summary.read_text())
    assert data["method"] == "past-kv" and data["prefix_len"] == 9
    assert DeepThinkAdapter.from_pretrained(out).config.provenance["layout"].startswith("[1,")
    tensors["layers.0.key"] = tensors["layers.0.key"][:, :1]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SystemExit, match="vllm-deepthink import past-kv: error: .*layer 0 key "
                                         "has shape"):
        cli.main(["import", "past-kv", str(tmp_path / "bad.safetensors"), "--model",
                  str(tiny_llama_dir), "--out", str(tmp_path / "out2")])


@pytest.mark.subprocess
def test_import_with_a_model_named_by_hub_id_offline(tiny_llama_dir, tmp_path):
    """`--model ORG/NAME` resolves through a real hub-cache layout (HF_HUB_OFFLINE=1, in a
    fresh process: huggingface_hub reads its environment at import): the adapter is bound
    to that snapshot's fingerprint and records the hub id; a PEFT adapter trained on
    ORG/NAME passes the base-model check by name."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT
    from tests.helpers.hub_cache import offline_env, publish

    cache = tmp_path / "cache"
    publish(tiny_llama_dir, cache, "org/tiny-llama")
    source = make_peft_adapter(tiny_llama_dir, "prompt", tmp_path / "peft", num_virtual_tokens=3)
    config_path = source / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-llama"}))
    env = {**os.environ, **offline_env(cache), "PYTHONPATH": str(REPO_ROOT)}

    def run(model, out):
        return subprocess.run([sys.executable, "-m", "vllm_deepthink.apps.cli", "import", "peft",
                               str(source), "--model", model, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)

    result = run("org/tiny-llama", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = DeepThinkAdapter.from_pretrained(
        tmp_path / "out", expected_fingerprint=ModelFingerprint.from_checkpoint(tiny_llama_dir))
    assert adapter.config.base_model_name_or_path == "org/tiny-llama"
    missing = run("org/missing", tmp_path / "out2")
    assert missing.returncode != 0 and "HF_HUB_OFFLINE=1" in missing.stderr
    assert not (tmp_path / "out2").exists()
