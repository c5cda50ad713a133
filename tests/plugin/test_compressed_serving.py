"""A compressed adapter is an ordinary adapter: served through `vllm.LLM` by the
unchanged plugin with parity to HF on the same compressed past_key_values, in one batch
with its uncompressed source and a plain prompt (tiny Llama)."""

from __future__ import annotations

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference, max_abs_diff
from tests.helpers.tiny_models import CORPUS, load_tiny
from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.producers.compress import DistillSettings, compress_adapter

pytestmark = pytest.mark.engine

CALIBRATION = [f"{line.split(chr(10))[0]} {i}" for i in range(4) for line in CORPUS]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    model_dir = tiny_llama_dir
    model, tokenizer = load_tiny("llama", model_dir)
    root = tmp_path_factory.mktemp("adapters")
    source = noisy_adapter(model, tokenizer, root / "full", 70)
    compressed = compress_adapter(
        DeepThinkAdapter.from_pretrained(root / "full"), model, tokenizer, CALIBRATION,
        prefix_len=20, distill=DistillSettings(steps=3, eval_every=3, batch_size=8),
        dev_size=6, progress=False)
    compressed.save_pretrained(root / "small")
    adapters = {"full": source, "small": DeepThinkAdapter.from_pretrained(root / "small")}
    return model_dir, model, tokenizer, adapters, root


@pytest.fixture(scope="module")
def llm(setup):
    model_dir, _, _, adapters, root = setup
    llm = start_engine(model_dir, {name: root / name for name in adapters})
    yield llm
    shutdown(llm)


def test_compressed_and_full_adapters_in_one_batch_match_hf(setup, llm):
    _, model, tokenizer, adapters, _ = setup
    assert adapters["small"].config.method == "compressed" and adapters["small"].prefix_len == 20
    requests = [("small", QUERIES[0]), ("full", QUERIES[0]), (None, QUERIES[1]),
                ("small", QUERIES[2]), ("full", QUERIES[3]), ("small", QUERIES[3])]
    outputs = llm.generate([text for _, text in requests],
                           [parity_params(name) for name, _ in requests], use_tqdm=False)
    references = {}
    for (name, text), output in zip(requests, outputs):
        if name is None:
            ids = tokenizer.encode(text, add_special_tokens=True)
            reference = hf_reference(model, None, ids)
        else:
            ids = tokenizer.encode(text, add_special_tokens=False)
            reference = hf_reference(model, adapters[name], ids)
        references[name, text] = reference
        assert_parity(output, reference, ids, label=f"{name}: {text[:20]!r}")
    # The compressed prefix is served as itself, not as its source.
    small, full = references["small", QUERIES[0]], references["full", QUERIES[0]]
    assert max_abs_diff(small.prompt_logprobs, full.prompt_logprobs) > 1e-3
