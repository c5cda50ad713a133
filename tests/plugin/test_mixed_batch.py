"""One engine, several adapters and plain prompts: batching, prefix-cache sharing,
isolation, runtime registration and errors (tiny Llama)."""

from __future__ import annotations

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference, icl_reference
from tests.helpers.tiny_models import load_tiny, make_tiny_model
import vllm_deepthink
from vllm_deepthink.plugin import registry as adapter_registry
from vllm_deepthink.plugin.api import connector_stats

pytestmark = pytest.mark.engine

PREFIX_LENS = {"a": 45, "b": 64, "c": 45}


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    model_dir = tiny_llama_dir
    model, tokenizer = load_tiny("llama", model_dir)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {name: noisy_adapter(model, tokenizer, root / name, length, seed=i, offset=i)
                for i, (name, length) in enumerate(PREFIX_LENS.items())}
    # Built on another model (same architecture, other weights): refused at start.
    other, _ = load_tiny("llama", make_tiny_model("llama", tmp_path_factory.mktemp("other"),
                                                  seed=1))
    noisy_adapter(other, tokenizer, root / "foreign", 32)
    return model_dir, model, tokenizer, adapters, root


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _, adapters, root = setup
    paths = {name: root / name for name in [*adapters, "foreign"]}
    # A small token budget chunks the query prefills across steps and batches.
    llm = start_engine(model_dir, paths, disable_log_stats=False, max_num_batched_tokens=32)
    yield llm
    shutdown(llm)


def cache_hits(llm) -> dict[str, float]:
    """Total local and external prefix-cache hits (tokens) so far."""
    totals = {"local": 0.0, "external": 0.0}
    for metric in llm.get_metrics():
        if metric.name == "vllm:prefix_cache_hits":
            totals["local"] += metric.value
        elif metric.name == "vllm:external_prefix_cache_hits":
            totals["external"] += metric.value
    return totals


def hits_of(llm, run) -> dict[str, float]:
    before = cache_hits(llm)
    result = run()
    after = cache_hits(llm)
    return result, {k: after[k] - before[k] for k in before}


def plain_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=True)  # vLLM's default for text


def test_one_call_mixes_adapters_and_plain_prompts(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    requests = [("a", QUERIES[0]), ("b", QUERIES[1]), (None, QUERIES[2]), ("c", QUERIES[0]),
                ("a", QUERIES[1]), (None, QUERIES[3]), ("b", QUERIES[3]), ("c", QUERIES[2])]
    outputs = llm.generate([text for _, text in requests],
                           [parity_params(name) for name, _ in requests], use_tqdm=False)
    for (name, text), output in zip(requests, outputs):
        if name is None:
            ids = plain_ids(tokenizer, text)
            reference = hf_reference(model, None, ids)
        else:
            ids = tokenizer.encode(text, add_special_tokens=False)
            reference = hf_reference(model, adapters[name], ids)
        assert_parity(output, reference, ids, label=f"mixed batch {name}: {text[:20]!r}")


def test_second_request_of_an_adapter_hits_the_prefix_cache(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    text = "Review: the quick brown fox\nSentiment:"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for name, prefix_len in (("b", 64), ("a", 45)):
        # Earlier tests served this adapter: its full blocks are cached, the
        # partial tail (L mod 32 positions) is loaded again.
        loads_before = connector_stats(llm)["by_adapter"].get(name, {"loads": 0, "tokens": 0})
        (output,), hits = hits_of(llm, lambda: llm.generate(
            [text], parity_params(name), use_tqdm=False))
        assert_parity(output, hf_reference(model, adapters[name], ids), ids,
                      label=f"cache hit {name}")
        assert hits == {"local": prefix_len // 32 * 32, "external": prefix_len % 32}, name
        # The connector counts a load only when it writes positions.
        loads_after = connector_stats(llm)["by_adapter"][name]
        assert loads_after["loads"] - loads_before["loads"] == (prefix_len % 32 > 0), name
        assert loads_after["tokens"] - loads_before["tokens"] == prefix_len % 32, name
        assert output.num_cached_tokens == 0  # the query itself was not cached


def test_plain_prompt_of_placeholder_ids_never_reuses_adapter_blocks(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    adapter = adapters["b"]
    query_ids = tokenizer.encode(QUERIES[0], add_special_tokens=False)
    placeholder_prompt = list(adapter.config.demo_token_ids) + query_ids
    icl = icl_reference(model, adapter, query_ids)
    with_adapter = hf_reference(model, adapter, query_ids)
    assert icl.greedy_tokens != with_adapter.greedy_tokens, "test needs distinguishable results"
    generation = parity_params(None, prompt_logprobs=None)  # reads the prefix cache
    for attempt in (1, 2):
        (output,), hits = hits_of(llm, lambda: llm.generate(
            [{"prompt_token_ids": placeholder_prompt}], generation, use_tqdm=False))
        assert list(output.outputs[0].token_ids) == icl.greedy_tokens
        if attempt == 1:
            assert hits["local"] == 0, "a plain prompt reused adapter blocks"
    # The plain prompt's own (unsalted) blocks are cached now; the adapter still
    # gets its own.
    (output,) = llm.generate([QUERIES[0]], parity_params("b"), use_tqdm=False)
    assert_parity(output, with_adapter, query_ids, label="adapter after plain prompt")


def test_parallel_sampling_with_an_adapter(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    ids = tokenizer.encode(QUERIES[2], add_special_tokens=False)
    reference = hf_reference(model, adapters["c"], ids, num_greedy=8)
    # n > 1 needs sampling; top_k=1 samples the argmax.
    params = vllm_deepthink.sampling_params(adapter="c", n=2, temperature=1.0, top_k=1,
                                            max_tokens=8, ignore_eos=True)
    (output,) = llm.generate([QUERIES[2]], params, use_tqdm=False)
    assert [list(o.token_ids) for o in output.outputs] == [reference.greedy_tokens] * 2
    assert list(output.prompt_token_ids) == ids


def assert_still_serving(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    ids = tokenizer.encode(QUERIES[2], add_special_tokens=False)
    (output,) = llm.generate([QUERIES[2]], parity_params("a"), use_tqdm=False)
    assert_parity(output, hf_reference(model, adapters["a"], ids), ids, label="still serving")


@pytest.mark.parametrize("adapter,query,message", [
    ("nope", QUERIES[0], "unknown adapter 'nope'; this engine serves \\['a', 'b', 'c'\\]"),
    ("foreign", QUERIES[0], "'foreign' failed to load at engine start.*embedding_sha256"),
    ("a", "", "the query has zero tokens"),
])
def test_request_errors_are_clear_and_the_engine_keeps_serving(setup, llm, adapter, query,
                                                               message):
    with pytest.raises(ValueError, match=message):
        llm.generate([query], parity_params(adapter), use_tqdm=False)
    assert_still_serving(setup, llm)


def test_runtime_registration_and_changed_weights(setup, llm, tmp_path):
    _, model, tokenizer, _, _ = setup
    registry = adapter_registry.registry_for(llm.llm_engine.vllm_config)
    ids = tokenizer.encode(QUERIES[1], add_special_tokens=False)

    first = noisy_adapter(model, tokenizer, tmp_path / "late", 40, seed=7)
    registry.register("late", tmp_path / "late")
    (output,) = llm.generate([QUERIES[1]], parity_params("late"), use_tqdm=False)
    assert_parity(output, hf_reference(model, first, ids), ids, label="runtime-registered")

    # New weights at the same path: served only once registered again (new
    # digest, new cache salt), never mixed with the old blocks.
    second = noisy_adapter(model, tokenizer, tmp_path / "late", 40, seed=8)
    (output,) = llm.generate([QUERIES[1]], parity_params("late"), use_tqdm=False)
    assert_parity(output, hf_reference(model, first, ids), ids, label="old weights still served")
    registry.register("late", tmp_path / "late")
    (output,) = llm.generate([QUERIES[1]], parity_params("late"), use_tqdm=False)
    assert_parity(output, hf_reference(model, second, ids), ids, label="re-registered")

    registry.unregister("late")
    with pytest.raises(ValueError, match="unknown adapter 'late'"):
        llm.generate([QUERIES[1]], parity_params("late"), use_tqdm=False)


def test_weights_changed_before_first_load_fail_the_request(setup, llm, tmp_path):
    _, model, tokenizer, _, _ = setup
    registry = adapter_registry.registry_for(llm.llm_engine.vllm_config)
    noisy_adapter(model, tokenizer, tmp_path / "swapped", 40, seed=9)
    registry.register("swapped", tmp_path / "swapped")
    # The files change after validation and before any worker loaded them: the
    # worker finds another digest and the request fails instead of answering.
    noisy_adapter(model, tokenizer, tmp_path / "swapped", 40, seed=10)
    (output,) = llm.generate([QUERIES[1]], parity_params("swapped"), use_tqdm=False)
    assert output.outputs[0].finish_reason == "error"
    registry.unregister("swapped")
    assert_still_serving(setup, llm)
