"""`vllm serve BASE --deepthink-adapter NAME=PATH` over HTTP, with the official openai client.

One real server per module (tiny Llama, fp32, CPU) serving three adapters: two from
`--deepthink-adapter-dir` and one from `--deepthink-adapter`, with prefix lengths below,
above and equal to the CPU block size (128). Every adapter answer is checked against
HF `model(query, past_key_values=adapter)`.
"""

from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from tests.helpers.adapter_factory import noisy_adapter  # noqa: E402
from tests.helpers.references import hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.openai_server import CHAT_TEMPLATE, VLLM_SCRIPT, VllmServer, openai_client  # noqa: E402
from tests.helpers.tiny_models import CORPUS, load_tiny  # noqa: E402

pytestmark = pytest.mark.engine

TOLERANCE = 1e-4
QUERY = "Review: a charming film\nSentiment:"
PREFIX_LENS = {"a1": 40, "a2": 150, "a3": 128}


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    root = tmp_path_factory.mktemp("server")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    store = root / "store"  # a1, a2 come from --deepthink-adapter-dir
    paths = {"a1": store / "a1", "a2": store / "a2", "a3": root / "single" / "a3"}
    adapters = {name: noisy_adapter(model, tokenizer, paths[name], PREFIX_LENS[name],
                                    seed=n + 1, offset=2 * n)
                for n, name in enumerate(PREFIX_LENS)}
    template = root / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    server = VllmServer(tiny_llama_dir,
                        ["--deepthink-adapter-dir", str(store),
                         "--deepthink-adapter", f"a3={paths['a3']}",
                         "--deepthink-resident-gib", "1",
                         "--chat-template", str(template)],
                        log_path=root / "server.log")
    try:
        server.start()
        server.wait_until_healthy()
        yield SimpleNamespace(client=openai_client(server), server=server, model=model,
                              tokenizer=tokenizer, adapters=adapters, paths=paths,
                              base=str(tiny_llama_dir), root=root, store=store)
    finally:
        server.stop()


def query_ids(served, text: str) -> list[int]:
    return served.tokenizer(text, add_special_tokens=False)["input_ids"]


def completion(served, model: str, prompt: str, max_tokens: int = 6, **kwargs):
    return served.client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
        extra_body={"return_token_ids": True}, **kwargs)


def test_models_lists_adapters_like_lora_modules(served):
    cards = {card.id: card for card in served.client.models.list().data}
    assert set(cards) == {served.base, "a1", "a2", "a3"}
    base = cards[served.base]
    for name, path in served.paths.items():
        card = cards[name]
        assert card.parent == served.base
        # name and weights digest: clients never see the server's paths
        assert card.root == f"{name}@sha256:{served.adapters[name].digest}"
        # What is left for query + completion after the adapter's prefix.
        assert card.max_model_len == base.max_model_len - PREFIX_LENS[name]


@pytest.mark.parametrize("name", list(PREFIX_LENS))
def test_echo_logprobs_match_hf_with_adapter_prefix(served, name):
    ids = query_ids(served, QUERY)
    reference = hf_reference(served.model, served.adapters[name], ids, num_greedy=6)
    response = completion(served, name, QUERY, echo=True, logprobs=0)
    assert response.model == name
    choice = response.choices[0]
    logprobs = choice.logprobs.token_logprobs
    # Echoed prompt = the query alone (no placeholder), then the 6 generated tokens.
    assert len(logprobs) == len(ids) + 6
    assert logprobs[0] is None
    diff = max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs)
    assert diff < TOLERANCE, f"{name}: query logprobs differ from HF by {diff}"
    assert choice.token_ids == reference.greedy_tokens
    assert response.usage.prompt_tokens == len(ids)


def test_base_model_is_served_as_before(served):
    with_bos = served.tokenizer(QUERY)["input_ids"]  # vLLM's default for the base model
    reference = hf_reference(served.model, None, with_bos, num_greedy=6)
    base = completion(served, served.base, QUERY, echo=True, logprobs=0)
    assert base.model == served.base
    logprobs = base.choices[0].logprobs.token_logprobs
    assert max_abs_diff(logprobs[1:len(with_bos)], reference.prompt_logprobs) < TOLERANCE
    assert base.choices[0].token_ids == reference.greedy_tokens
    adapter_answers = {tuple(completion(served, name, QUERY).choices[0].token_ids)
                       for name in PREFIX_LENS}
    assert tuple(reference.greedy_tokens) not in adapter_answers


@pytest.mark.parametrize("model", ["no-such-adapter", "../a1", "a1/../a2"])
def test_unknown_model_is_404_in_openai_shape(served, model):
    with pytest.raises(openai.NotFoundError) as info:
        completion(served, model, QUERY)
    error = info.value.body
    assert info.value.status_code == 404
    assert error["code"] == 404 and error["type"] == "NotFoundError"
    assert model in error["message"]
    assert "Deep-Thinking adapters: a1, a2, a3." in error["message"]


def test_streaming_completion(served):
    whole = completion(served, "a2", QUERY, max_tokens=8)
    stream = served.client.completions.create(model="a2", prompt=QUERY, max_tokens=8,
                                              temperature=0.0, stream=True)
    chunks = list(stream)
    assert chunks and all(chunk.model == "a2" for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_with_adapter(served):
    messages = [{"role": "user", "content": "Review: a charming film"}]
    rendered = "user: Review: a charming film\nassistant:"  # CHAT_TEMPLATE
    ids = query_ids(served, rendered)
    reference = hf_reference(served.model, served.adapters["a1"], ids, num_greedy=6)
    response = served.client.chat.completions.create(
        model="a1", messages=messages, max_tokens=6, temperature=0.0,
        extra_body={"return_token_ids": True})
    assert response.model == "a1"
    assert response.choices[0].token_ids == reference.greedy_tokens
    assert response.usage.prompt_tokens == len(ids)
    stream = served.client.chat.completions.create(
        model="a1", messages=messages, max_tokens=6, temperature=0.0, stream=True)
    chunks = list(stream)
    assert chunks and all(chunk.model == "a1" for chunk in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == response.choices[0].message.content


def concurrent_workload(served) -> list[tuple[str, str]]:
    """64 (model, prompt) pairs: 16 queries under each of 3 adapters and the base model;
    the same query text appears under every model."""
    texts = [line for text in CORPUS for line in text.split("\n")]
    queries = [texts[i % len(texts)][: 12 + 3 * i] for i in range(16)]
    models = ["a1", "a2", "a3", served.base]
    return [(models[i % 4], queries[i // 4]) for i in range(64)]


def test_64_concurrent_requests_equal_the_same_requests_alone(served):
    workload = concurrent_workload(served)
    alone = [completion(served, model, prompt, max_tokens=6).choices[0].token_ids
             for model, prompt in workload]

    async def send_all():
        client = openai.AsyncOpenAI(base_url=served.server.base_url + "/v1", api_key="EMPTY",
                                    max_retries=0, timeout=300.0)
        try:
            return await asyncio.gather(*(
                client.completions.create(model=model, prompt=prompt, max_tokens=6,
                                          temperature=0.0, extra_body={"return_token_ids": True})
                for model, prompt in workload))
        finally:
            await client.close()

    together = asyncio.run(send_all())
    for (model, prompt), single, response in zip(workload, alone, together):
        assert response.model == model
        assert response.choices[0].token_ids == single, f"{model} {prompt!r}"
    # Every adapter answer is also HF's (the alone run is not just self-consistent).
    for (model, prompt), single in list(zip(workload, alone))[:8]:
        adapter = served.adapters.get(model)
        ids = (query_ids(served, prompt) if adapter is not None
               else served.tokenizer(prompt)["input_ids"])
        assert single == hf_reference(served.model, adapter, ids, num_greedy=6).greedy_tokens


def adapter_loads_metric(served) -> dict[str, float]:
    """vllm:deepthink_adapter_loads_total by adapter, from the server's /metrics."""
    import re
    import urllib.request

    with urllib.request.urlopen(served.server.base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    loads = {}
    for match in re.finditer(r'^vllm:deepthink_adapter_loads_total\{([^}]*)\} ([0-9.e+]+)$',
                             text, re.MULTILINE):
        adapter = re.search(r'adapter="([^"]*)"', match.group(1)).group(1)
        loads[adapter] = loads.get(adapter, 0.0) + float(match.group(2))
    return loads


def test_metrics_count_adapter_loads(served):
    before = adapter_loads_metric(served)
    completion(served, "a1", "Review: an entirely new query for the metrics\nSentiment:")
    after = adapter_loads_metric(served)
    # a1 (L=40) is shorter than a block (128): every request writes it again.
    assert after.get("a1", 0) - before.get("a1", 0) == 1
    assert after.get("a3", 0) == before.get("a3", 0)


def test_adapter_dropped_into_the_adapter_dir_is_served_without_restart(served):
    late = noisy_adapter(served.model, served.tokenizer, served.root / "late", 50, seed=9)
    shutil.copytree(served.root / "late", served.store / "late")
    ids = query_ids(served, QUERY)
    reference = hf_reference(served.model, late, ids, num_greedy=6)
    response = completion(served, "late", QUERY, echo=True, logprobs=0)
    assert response.model == "late"
    logprobs = response.choices[0].logprobs.token_logprobs
    assert max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs) < TOLERANCE
    assert "late" in {card.id for card in served.client.models.list().data}
    # An invalid adapter in the folder is a 400 naming the reason, not a 404 or a 500.
    (served.store / "broken").mkdir()
    (served.store / "broken" / "deepthink_config.json").write_text("{}")
    with pytest.raises(openai.BadRequestError) as info:
        completion(served, "broken", QUERY)
    assert "cannot be served" in info.value.body["message"]
    # Every other tenant is still served.
    assert completion(served, "a1", QUERY).choices[0].token_ids
