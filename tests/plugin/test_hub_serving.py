"""`vllm serve ORG/NAME --deepthink-adapter NAME=ORG/ADAPTER`: the base model and the
adapter named by hub id, resolved from a real hub-cache layout with HF_HUB_OFFLINE=1.

The whole path of a user outside this repository: `vllm-deepthink build --model ORG/NAME
--revision REV --dataset FILES` (the model from the hub cache under HF_HOME, the rows
through the `datasets` library), the adapter published to the hub cache, then served by
hub id next to another one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.datasets_files import write_reviews_dataset
from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.references import hf_reference, max_abs_diff
from tests.helpers.hub_cache import offline_env, publish
from tests.helpers.openai_server import VllmServer, openai_client
from tests.helpers.tiny_models import load_tiny, make_tiny_model

pytestmark = pytest.mark.engine

QUERY = "Review: a charming film\nSentiment:"


def build_from_hub_model_and_dataset(root: Path, home: Path) -> Path:
    """`vllm-deepthink build --model org/tiny-llama --revision v1 --dataset DIR` in a
    fresh process that sees only the hub cache under HF_HOME, offline."""
    pytest.importorskip("datasets")
    data = write_reviews_dataset(root / "reviews")
    out = root / "reviews-adapter"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONPATH": str(REPO_ROOT)})
    result = subprocess.run(
        [sys.executable, "-m", "vllm_deepthink.apps.cli", "build", "--model", "org/tiny-llama",
         "--revision", "v1", "--dataset", str(data), "--shots-per-class", "1",
         "--iterations", "2", "--dev-size", "6", "--guard-k", "0", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-serving")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    adapter = noisy_adapter(model, tokenizer, root / "adapter", 40, seed=3)
    home = root / "hf-home"
    cache = home / "hub"  # HF_HOME/hub is where huggingface_hub looks by default
    # main is another model (other weights): only --revision v1 reaches the tiny model
    make_tiny_model("llama", root / "other", seed=1)
    publish(root / "other", cache, "org/tiny-llama", refs=("main",))
    publish(tiny_llama_dir, cache, "org/tiny-llama", refs=("v1",))
    commit = publish(root / "adapter", cache, "org/sst2-adapter")
    built = build_from_hub_model_and_dataset(root, home)
    reviews = cache / "models--org--reviews-adapter" / "snapshots" / publish(
        built, cache, "org/reviews-adapter")
    server = VllmServer("org/tiny-llama", ["--revision", "v1",
                                           "--deepthink-adapter", "sst2=org/sst2-adapter",
                                           "reviews=org/reviews-adapter"],
                        log_path=root / "server.log", env=offline_env(cache))
    try:
        server.start()
        server.wait_until_healthy()
        yield server, openai_client(server), model, tokenizer, adapter, reviews
    finally:
        server.stop()


def test_adapter_named_by_hub_id_is_served_with_hf_parity(served):
    server, client, model, tokenizer, adapter, _ = served
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"org/tiny-llama", "sst2", "reviews"}
    assert cards["sst2"].parent == "org/tiny-llama"
    assert cards["sst2"].root == f"sst2@sha256:{adapter.digest}"  # no server path
    ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    reference = hf_reference(model, adapter, ids, num_greedy=4)
    response = client.completions.create(model="sst2", prompt=QUERY, max_tokens=4,
                                         temperature=0.0, echo=True, logprobs=0,
                                         extra_body={"return_token_ids": True})
    logprobs = response.choices[0].logprobs.token_logprobs
    assert max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs) < 1e-4
    assert response.choices[0].token_ids == reference.greedy_tokens


def test_adapter_built_from_a_hub_model_and_a_dataset_is_served_by_hub_id(served):
    """The adapter `build` made from org/tiny-llama (HF_HOME, --revision) and a csv
    dataset: bound to that model's fingerprint, named by its hub id, served with parity."""
    from vllm_deepthink.format import DeepThinkAdapter

    server, client, model, tokenizer, _, reviews = served
    card = {c.id: c for c in client.models.list().data}["reviews"]
    adapter = DeepThinkAdapter.from_pretrained(reviews)
    assert card.root == f"reviews@sha256:{adapter.digest}"
    assert adapter.config.base_model_name_or_path == "org/tiny-llama"
    assert adapter.config.task["name"] == "reviews"
    assert "Review: review number" in adapter.config.demos_text
    ids = tokenizer("Review: fine work\nSentiment:", add_special_tokens=False)["input_ids"]
    reference = hf_reference(model, adapter, ids, num_greedy=4)
    response = client.completions.create(model="reviews", prompt="Review: fine work\nSentiment:",
                                         max_tokens=4, temperature=0.0, echo=True, logprobs=0,
                                         extra_body={"return_token_ids": True})
    logprobs = response.choices[0].logprobs.token_logprobs
    assert max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs) < 1e-4
    assert response.choices[0].token_ids == reference.greedy_tokens
