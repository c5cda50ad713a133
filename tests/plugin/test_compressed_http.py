"""A compressed adapter served by `vllm serve` over HTTP (one real server for the module,
tiny Llama, fp32, CPU): the output of `vllm-deepthink build --ratio 4` next to an
uncompressed adapter, a format_version 1 adapter and a first format_version 2 adapter
(no selection / label_calibration / compression keys). Every answer is checked against HF
`model(query, past_key_values=adapter)` with the adapter's own K/V (the compressed k
positions for the compressed one): echoed logprobs within 1e-4, the same greedy tokens,
alone and sent all at once. (tests/plugin/test_compressed_serving.py covers `vllm.LLM`,
with the compressed adapter and its source in one generate call.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from tests.conftest import SHIPPED_DATA  # noqa: E402
from tests.helpers.adapter_factory import (noisy_adapter, write_first_v2_adapter,  # noqa: E402
                                           write_v1_adapter)
from tests.helpers.engines import QUERIES  # noqa: E402
from tests.helpers.references import hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer, openai_client  # noqa: E402
from tests.helpers.tiny_models import load_tiny  # noqa: E402
from vllm_deepthink.apps import cli  # noqa: E402
from vllm_deepthink.format import DeepThinkAdapter  # noqa: E402

pytestmark = pytest.mark.engine

TOLERANCE = 1e-4
NUM_GREEDY = 8
ADAPTERS = ("small", "full", "v1", "v2")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    root = tmp_path_factory.mktemp("compressed-http")
    model_dir = root / "tiny-llama"
    model, tokenizer = load_tiny("llama", model_dir)
    store = root / "store"
    # Built and compressed in one command: queries from SST-2's train rows.
    assert cli.main(["build", "--model", str(model_dir), "--task-dir", str(SHIPPED_DATA / "sst2"),
                     "--iterations", "1", "--select-on", "none", "--shots-per-class", "2",
                     "--out", str(store / "small"), "--ratio", "4", "--num-queries", "24",
                     "--compress-dev-size", "6", "--distill", "--steps", "2",
                     "--eval-every", "1", "--batch-size", "8"]) == 0
    noisy_adapter(model, tokenizer, store / "full", 70, seed=1)
    write_v1_adapter(noisy_adapter(model, tokenizer, root / "v1-source", 30, seed=2, offset=1),
                     store / "v1")
    write_first_v2_adapter(noisy_adapter(model, tokenizer, root / "v2-source", 50, seed=3,
                                         offset=2), store / "v2")
    adapters = {name: DeepThinkAdapter.from_pretrained(store / name) for name in ADAPTERS}
    server = VllmServer(model_dir, ["--deepthink-adapter-dir", str(store)],
                        log_path=root / "server.log")
    try:
        server.start()
        server.wait_until_healthy()
        yield SimpleNamespace(client=openai_client(server), server=server, model=model,
                              tokenizer=tokenizer, adapters=adapters, base=str(model_dir))
    finally:
        server.stop()


def reference(served, model: str, text: str):
    """(query ids as echoed, HF's reference): an adapter's query has no BOS, the base
    model's prompt has vLLM's default one."""
    adapter = served.adapters.get(model)
    ids = served.tokenizer(text, add_special_tokens=adapter is None)["input_ids"]
    return ids, hf_reference(served.model, adapter, ids, num_greedy=NUM_GREEDY)


def check(served, model: str, text: str, response) -> None:
    ids, ref = reference(served, model, text)
    assert response.model == model
    choice = response.choices[0]
    logprobs = choice.logprobs.token_logprobs
    assert len(logprobs) == len(ids) + NUM_GREEDY and logprobs[0] is None
    diff = max_abs_diff(logprobs[1:len(ids)], ref.prompt_logprobs)
    assert diff <= TOLERANCE, f"{model} {text[:30]!r}: query logprobs differ from HF by {diff}"
    assert choice.token_ids == ref.greedy_tokens, f"{model} {text[:30]!r}"
    assert response.usage.prompt_tokens == len(ids)


def request(model: str, text: str) -> dict:
    return dict(model=model, prompt=text, max_tokens=NUM_GREEDY, temperature=0.0, echo=True,
                logprobs=0, extra_body={"return_token_ids": True, "ignore_eos": True})


def test_the_adapters_are_what_they_should_be(served):
    small, full = served.adapters["small"].config, served.adapters["full"].config
    assert small.method == "compressed" and small.compression["distill"]["steps_run"] == 2
    assert small.prefix_len == round(small.compression["source_prefix_len"] / 4)
    assert full.method == "deepthink" and full.compression is None
    cards = {card.id: card for card in served.client.models.list().data}
    assert set(ADAPTERS) <= set(cards)
    base = cards[served.base]
    for name in ADAPTERS:  # k positions taken from the context, not L
        assert cards[name].max_model_len == base.max_model_len - served.adapters[name].prefix_len


@pytest.mark.parametrize("name", ADAPTERS)
def test_each_adapter_alone_matches_hf(served, name):
    text = QUERIES[2]
    check(served, name, text, served.client.completions.create(**request(name, text)))


def test_compressed_and_uncompressed_sent_at_once_match_hf(served):
    """All at once: the engine schedules what arrives together in shared steps, the
    compressed adapter's k-position prefix beside L-position ones and plain prompts."""
    workload = [(model, QUERIES[i % len(QUERIES)]) for i, model in enumerate(
        ["small", "full", served.base, "v1", "small", "v2", "full", "small", served.base,
         "v1", "small", "v2"])]

    async def send_all():
        client = openai.AsyncOpenAI(base_url=served.server.base_url + "/v1", api_key="EMPTY",
                                    max_retries=0, timeout=300.0)
        try:
            return await asyncio.gather(*(client.completions.create(**request(model, text))
                                          for model, text in workload))
        finally:
            await client.close()

    responses = asyncio.run(send_all())
    for (model, text), response in zip(workload, responses):
        check(served, model, text, response)
    # The compressed prefix is served as itself: its answers are not the plain model's.
    small = reference(served, "small", QUERIES[0])[1]
    plain = hf_reference(served.model, None, reference(served, "small", QUERIES[0])[0],
                         num_greedy=0)
    assert max_abs_diff(small.prompt_logprobs, plain.prompt_logprobs) > 1e-3
