"""The frontend serves imported adapters with their config's placeholder ids (no engine)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.adapter_factory import noisy_adapter, write_v1_adapter
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import PLACEHOLDER_TOKEN_ID, ModelFingerprint
from vllm_deepthink.plugin import registry as adapter_registry
from vllm_deepthink.producers.past_kv import import_past_kv


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return tiny_llama_dir, model, tokenizer


def test_registry_uses_the_configs_placeholder_ids(llama, tmp_path):
    model_dir, model, tokenizer = llama
    fp = ModelFingerprint.from_checkpoint(model_dir)
    generator = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.{kind}": torch.randn(fp.num_kv_heads, 7, fp.head_dim,
                                                 generator=generator)
               for i in range(fp.num_layers) for kind in ("key", "value")},
              str(tmp_path / "kv.safetensors"))
    import_past_kv(tmp_path / "kv.safetensors", model_dir).save_pretrained(tmp_path / "kv")
    built = noisy_adapter(model, tokenizer, tmp_path / "dt", 9)
    write_v1_adapter(built, tmp_path / "v1")
    registry = adapter_registry.AdapterRegistry(model_dir)
    kv = registry.register("kv", tmp_path / "kv")
    assert kv.placeholder_ids == (PLACEHOLDER_TOKEN_ID,) * 7 and kv.prefix_len == 7
    assert registry.register("dt", tmp_path / "dt").placeholder_ids == tuple(
        built.config.demo_token_ids)
    assert registry.register("v1", tmp_path / "v1").placeholder_ids == tuple(
        built.config.demo_token_ids)
    # Same placeholder ids, other adapters: other salts.
    assert kv.cache_salt() != registry.get("dt").cache_salt()
