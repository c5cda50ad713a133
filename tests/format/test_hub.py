"""Models and adapters named by hub id resolve through huggingface_hub's own code path,
from a real hub-cache layout on disk with HF_HUB_OFFLINE=1 (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.hub_cache import offline_env, publish
from tests.helpers.tiny_models import load_tiny


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model, tokenizer = load_tiny("llama", root / "tiny")
    noisy_adapter(model, tokenizer, root / "adapter-v1", 20, seed=1)
    noisy_adapter(model, tokenizer, root / "adapter-v2", 24, seed=2)
    cache = root / "cache"
    publish(root / "tiny", cache, "org/tiny-llama")
    v1 = publish(root / "adapter-v1", cache, "org/sst2-adapter", refs=("v1",))
    publish(root / "adapter-v2", cache, "org/sst2-adapter", refs=("main",))
    return root, cache, v1


def run_offline(cache, code: str) -> dict:
    env = {**os.environ, **offline_env(cache), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_hub_ids_resolve_from_the_cache_offline(hub):
    root, cache, v1 = hub
    out = run_offline(cache, f"""
        import json
        from vllm_deepthink import DeepThinkAdapter
        from vllm_deepthink.format import ModelFingerprint
        from vllm_deepthink.format.hub import resolve_dir
        local = ModelFingerprint.from_checkpoint({str(root / "tiny")!r})
        hub = ModelFingerprint.from_checkpoint("org/tiny-llama")
        main = DeepThinkAdapter.from_pretrained("org/sst2-adapter", expected_fingerprint=hub)
        tag = DeepThinkAdapter.from_pretrained("org/sst2-adapter", revision="v1")
        by_commit = DeepThinkAdapter.from_pretrained("org/sst2-adapter", revision={v1!r})
        print(json.dumps({{"same_fingerprint": local == hub,
                           "model_dir": str(resolve_dir("org/tiny-llama")),
                           "lengths": [main.prefix_len, tag.prefix_len, by_commit.prefix_len]}}))
    """)
    assert out["same_fingerprint"]
    assert "models--org--tiny-llama/snapshots/" in out["model_dir"]
    assert out["lengths"] == [24, 20, 20]


@pytest.mark.subprocess
def test_unknown_hub_id_offline_says_what_to_do(hub):
    _, cache, _ = hub
    out = run_offline(cache, """
        import json
        from vllm_deepthink import DeepThinkAdapter
        from vllm_deepthink.format import AdapterFormatError
        try:
            DeepThinkAdapter.from_pretrained("org/missing")
        except AdapterFormatError as exc:
            print(json.dumps({"error": str(exc)}))
    """)
    assert "'org/missing'" in out["error"] and "HF_HUB_OFFLINE=1" in out["error"]
    assert "huggingface-cli download org/missing" in out["error"]
