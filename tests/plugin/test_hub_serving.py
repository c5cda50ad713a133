"""`vllm serve ORG/NAME --deepthink-adapter NAME=ORG/ADAPTER`: the base model and the
adapter named by hub id, resolved from a real hub-cache layout with HF_HUB_OFFLINE=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.adapter_factory import build_adapter, hf_reference, max_abs_diff
from tests.helpers.hub_cache import offline_env, publish
from tests.helpers.openai_server import VllmServer, openai_client
from tests.helpers.tiny_models import load_tiny

pytestmark = pytest.mark.engine

QUERY = "Review: a charming film\nSentiment:"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-serving")
    model, tokenizer = load_tiny("llama", root / "tiny")
    adapter = build_adapter(model, tokenizer, root / "adapter", 40, seed=3)
    cache = root / "cache"
    publish(root / "tiny", cache, "org/tiny-llama")
    commit = publish(root / "adapter", cache, "org/sst2-adapter")
    server = VllmServer("org/tiny-llama", ["--deepthink-adapter", "sst2=org/sst2-adapter"],
                        log_path=root / "server.log", env=offline_env(cache))
    try:
        server.start()
        server.wait_until_healthy()
        yield server, openai_client(server), model, tokenizer, adapter, commit
    finally:
        server.stop()


def test_adapter_named_by_hub_id_is_served_with_hf_parity(served):
    server, client, model, tokenizer, adapter, commit = served
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"org/tiny-llama", "sst2"}
    assert cards["sst2"].parent == "org/tiny-llama"
    assert Path(cards["sst2"].root).parts[-2:] == ("snapshots", commit)
    ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    reference = hf_reference(model, adapter, ids, num_greedy=4)
    response = client.completions.create(model="sst2", prompt=QUERY, max_tokens=4,
                                         temperature=0.0, echo=True, logprobs=0,
                                         extra_body={"return_token_ids": True})
    logprobs = response.choices[0].logprobs.token_logprobs
    assert max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs) < 1e-4
    assert response.choices[0].token_ids == reference.greedy_tokens
