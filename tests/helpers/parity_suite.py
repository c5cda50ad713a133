"""Parity tests shared by the tiny Llama (GQA) and tiny GPT-2 modules.

A subclass sets `kind`; it gets one engine (class scope) serving two adapters,
L = 64 (a multiple of the 32-token block) and L = 45 (not), and checks vLLM
against HF `model(query, past_key_values=adapter)`.
"""

from __future__ import annotations

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import (
    BLOCK_SIZE,
    QUERIES,
    assert_parity,
    parity_params,
    shutdown,
    start_engine,
)
from tests.helpers.references import hf_reference, icl_reference, max_abs_diff
from tests.helpers.tiny_models import load_tiny

PREFIX_LENS = {"aligned": 2 * BLOCK_SIZE, "unaligned": 45}


class ParitySuite:
    kind = ""

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, request, tmp_path_factory):
        model_dir = request.getfixturevalue(f"tiny_{cls.kind}_dir")
        model, tokenizer = load_tiny(cls.kind, model_dir)
        root = tmp_path_factory.mktemp(f"{cls.kind}-adapters")
        adapters = {name: noisy_adapter(model, tokenizer, root / name, length,
                                        seed=i, offset=i)
                    for i, (name, length) in enumerate(PREFIX_LENS.items())}
        return model_dir, model, tokenizer, adapters, {n: root / n for n in adapters}

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, setup):
        model_dir, _, _, _, paths = setup
        llm = start_engine(model_dir, paths)
        yield llm
        shutdown(llm)

    @pytest.mark.parametrize("name", sorted(PREFIX_LENS))
    def test_prompt_logprobs_and_greedy_match_hf(self, setup, llm, name):
        _, model, tokenizer, adapters, _ = setup
        adapter = adapters[name]
        query_ids = tokenizer.encode(QUERIES[0], add_special_tokens=False)
        reference = hf_reference(model, adapter, query_ids)
        # The adapter must matter: its result is far from plain ICL of its demos.
        assert max_abs_diff(reference.prompt_logprobs,
                            icl_reference(model, adapter, query_ids, num_greedy=0)
                            .prompt_logprobs) > 0.05
        (output,) = llm.generate([QUERIES[0]], parity_params(name), use_tqdm=False)
        assert_parity(output, reference, query_ids,
                      label=f"{self.kind} {name} L={adapter.prefix_len}")
        assert output.num_cached_tokens == 0

    @pytest.mark.parametrize("name", sorted(PREFIX_LENS))
    def test_same_query_twice_in_a_row(self, setup, llm, name):
        # The query is longer than a block, so the second request could hit the
        # first one's blocks past L in the prefix cache; its query rows must
        # still be computed and scored.
        _, model, tokenizer, adapters, _ = setup
        query_ids = tokenizer.encode(QUERIES[1], add_special_tokens=False)
        reference = hf_reference(model, adapters[name], query_ids)
        for attempt in (1, 2):
            (output,) = llm.generate([QUERIES[1]], parity_params(name), use_tqdm=False)
            assert_parity(output, reference, query_ids,
                          label=f"{self.kind} {name} same query, attempt {attempt}")

    def test_token_id_prompt_used_as_given(self, setup, llm):
        _, model, tokenizer, adapters, _ = setup
        query_ids = tokenizer.encode(QUERIES[2], add_special_tokens=True)  # BOS kept
        reference = hf_reference(model, adapters["unaligned"], query_ids)
        (output,) = llm.generate([{"prompt_token_ids": query_ids}], parity_params("unaligned"),
                                 use_tqdm=False)
        assert_parity(output, reference, query_ids, label=f"{self.kind} token-id prompt")

    def test_generation_reuses_cached_query_blocks(self, setup, llm):
        # Without prompt logprobs the local hit may reach past L into the query's
        # own cached blocks; num_cached_tokens counts those query positions only.
        _, model, tokenizer, adapters, _ = setup
        adapter = adapters["unaligned"]
        query_ids = tokenizer.encode(QUERIES[3], add_special_tokens=False)
        reference = hf_reference(model, adapter, query_ids)
        total = adapter.prefix_len + len(query_ids)
        expected_cached = (total - 1) // BLOCK_SIZE * BLOCK_SIZE - adapter.prefix_len
        assert expected_cached > 0
        for attempt in (1, 2):
            (output,) = llm.generate([QUERIES[3]],
                                     parity_params("unaligned", prompt_logprobs=None),
                                     use_tqdm=False)
            assert list(output.prompt_token_ids) == query_ids
            assert list(output.outputs[0].token_ids) == reference.greedy_tokens, attempt
            assert output.num_cached_tokens == (0 if attempt == 1 else expected_cached)
