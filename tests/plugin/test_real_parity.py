"""Parity on the real default models: SmolLM2-135M (Llama, GQA) and Gemma 3 270M
(sliding-window layers, query_pre_attn_scalar, tied embeddings)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference, icl_reference, max_abs_diff

pytestmark = [pytest.mark.slow, pytest.mark.engine]

QUERIES = ["Review: a charming and often affecting journey .\nSentiment:",
           "Question: What is the capital of Australia ?\nType: The answer is a location, "
           "a city in the south east of the country, planned as a capital."]
PREFIX_LENS = {"aligned": 64, "unaligned": 45}


class RealParity:
    model_fixture = ""

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, request, tmp_path_factory):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = request.getfixturevalue(cls.model_fixture)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        root = tmp_path_factory.mktemp("adapters")
        adapters = {name: noisy_adapter(model, tokenizer, root / name, length, seed=i, offset=i,
                                        noise=0.1)
                    for i, (name, length) in enumerate(PREFIX_LENS.items())}
        return model_dir, model, tokenizer, adapters, {n: root / n for n in adapters}

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, setup):
        model_dir, _, _, _, paths = setup
        llm = start_engine(model_dir, paths, max_num_seqs=4)
        yield llm
        shutdown(llm)

    def test_parity(self, setup, llm):
        _, model, tokenizer, adapters, _ = setup
        requests = [("aligned", QUERIES[0]), ("unaligned", QUERIES[1])]
        outputs = llm.generate([q for _, q in requests], [parity_params(n) for n, _ in requests],
                               use_tqdm=False)
        # The same query again, in a second call: its blocks past L are cached now.
        outputs += llm.generate([QUERIES[1]], parity_params("unaligned"), use_tqdm=False)
        requests.append(("unaligned", QUERIES[1]))
        references = {}
        for (name, query), output in zip(requests, outputs):
            ids = tokenizer.encode(query, add_special_tokens=False)
            if (name, query) not in references:
                references[name, query] = hf_reference(model, adapters[name], ids)
                icl = icl_reference(model, adapters[name], ids, num_greedy=0)
                assert max_abs_diff(references[name, query].prompt_logprobs,
                                    icl.prompt_logprobs) > 0.01, "the adapter has no effect"
            assert_parity(output, references[name, query], ids,
                          label=f"{self.model_fixture} {name}: {query[:20]!r}")


class TestSmolLM2(RealParity):
    model_fixture = "smollm2_dir"


class TestGemma3(RealParity):
    model_fixture = "gemma3_dir"
