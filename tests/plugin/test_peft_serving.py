"""Imported KV prefixes served through `vllm.LLM`: PEFT prefix tuning (with and without
prefix_projection), prompt tuning, P-tuning, multitask prompt tuning, raw past-kv, next
to Deep-Thinking adapters (format v2 and a format v1 one), on tiny Llama (GQA, RoPE)
and tiny GPT-2 (learned positions), one engine per family.

References: PEFT adapters against `PeftModel.from_pretrained` on one unpadded sequence
(`tokenizer(text)`, i.e. BOS after the virtual tokens); past-kv and Deep-Thinking
against HF `model(query, past_key_values=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

peft = pytest.importorskip("peft")

from tests.helpers.adapter_factory import noisy_adapter, write_v1_adapter  # noqa: E402
from tests.helpers.engines import (  # noqa: E402
    BLOCK_SIZE,
    QUERIES,
    assert_parity,
    parity_params,
    shutdown,
    start_engine,
)
from tests.helpers.references import Reference, hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.peft_adapters import (load_reference_model, make_peft_adapter,  # noqa: E402
                                         peft_reference)
from tests.helpers.tiny_models import load_tiny  # noqa: E402
from vllm_deepthink.format import DeepThinkAdapter  # noqa: E402
from vllm_deepthink.producers.past_kv import import_past_kv  # noqa: E402
from vllm_deepthink.producers.peft import import_peft_adapter  # noqa: E402

pytestmark = pytest.mark.engine

NUM_GREEDY = 8
# name -> (PEFT kind, num_virtual_tokens, import options). "prefix" has 40 virtual
# tokens + BOS: its first cache block is placeholders only.
PEFT_ADAPTERS = {
    "prefix": ("prefix", 40, {}),
    "prefix-proj": ("prefix-proj", 5, {}),
    "prompt": ("prompt", 6, {}),
    "ptuning": ("ptuning", 5, {}),
    "multitask": ("multitask", 5, {"task_id": 1}),
    "prefix-nobos": ("prefix", 8, {"query_special_tokens": "none"}),
}
OTHERS = ("past-kv", "deepthink", "deepthink-v1")


@dataclass
class Served:
    adapter: DeepThinkAdapter
    reference: Callable[[list[int]], Reference]   # query ids (no special tokens) -> result


def past_kv_file(model, tokenizer, path, length=33):
    """A perturbed HF cache of `length` tokens, saved as [1, H, L, D] safetensors."""
    from safetensors.torch import save_file

    ids = tokenizer("\n".join(QUERIES), add_special_tokens=True)["input_ids"][:length]
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for i, layer in enumerate(cache.layers):
        for kind, t in (("key", layer.keys), ("value", layer.values)):
            tensors[f"layers.{i}.{kind}"] = (t + 0.3 * t.std() * torch.randn(
                t.shape, generator=generator)).contiguous()
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"peft-serving-{family}")
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model, tokenizer = load_tiny(family, model_dir)
    bos = tokenizer.bos_token_id
    served: dict[str, Served] = {}
    for i, (name, (kind, virtual, options)) in enumerate(PEFT_ADAPTERS.items()):
        source = make_peft_adapter(model_dir, kind, root / "peft" / name,
                                   num_virtual_tokens=virtual, seed=10 + i)
        adapter = import_peft_adapter(source, model_dir, **options)
        adapter.save_pretrained(root / "store" / name)
        reference_model = load_reference_model(model_dir, source)
        specials = [] if options.get("query_special_tokens") == "none" else [bos]

        def reference(ids, pm=reference_model, specials=specials, task=options.get("task_id")):
            return peft_reference(pm, specials + ids, len(specials), task_id=task,
                                  num_greedy=NUM_GREEDY)

        served[name] = Served(adapter, reference)
    adapter = import_past_kv(past_kv_file(model, tokenizer, root / "cache.safetensors"),
                             model_dir)
    adapter.save_pretrained(root / "store" / "past-kv")
    deepthink = noisy_adapter(model, tokenizer, root / "store" / "deepthink", 45, seed=3)
    v1 = write_v1_adapter(noisy_adapter(model, tokenizer, root / "v1-source", 20, seed=4,
                                        offset=2), root / "store" / "deepthink-v1")
    for name, a in (("past-kv", adapter), ("deepthink", deepthink),
                    ("deepthink-v1", DeepThinkAdapter.from_pretrained(v1))):
        served[name] = Served(a, lambda ids, a=a: hf_reference(model, a, ids,
                                                                  num_greedy=NUM_GREEDY))
    return family, model_dir, model, tokenizer, served, root / "store"


@pytest.fixture(scope="module")
def llm(setup):
    _, model_dir, _, _, served, store = setup
    llm = start_engine(model_dir, {name: store / name for name in served})
    yield llm
    shutdown(llm)


def query(tokenizer, n: int) -> list[int]:
    return tokenizer.encode(QUERIES[n], add_special_tokens=False)


@pytest.mark.parametrize("name", [*PEFT_ADAPTERS, *OTHERS])
def test_served_adapter_matches_its_reference(setup, llm, name):
    family, _, model, tokenizer, served, _ = setup
    ids = query(tokenizer, 0)
    reference = served[name].reference(ids)
    # The adapter matters: the plain model gives other logprobs for the query.
    assert max_abs_diff(reference.prompt_logprobs,
                        hf_reference(model, None, ids, num_greedy=0).prompt_logprobs) > 0.05
    (output,) = llm.generate([QUERIES[0]], parity_params(name, num_greedy=NUM_GREEDY),
                             use_tqdm=False)
    assert_parity(output, reference, ids,
                  label=f"{family} {name} ({served[name].adapter.config.method}, "
                        f"L={served[name].adapter.prefix_len})")


def test_v1_adapter_is_served_as_deepthink(setup):
    _, _, _, _, served, store = setup
    assert '"format_version": 1' in (store / "deepthink-v1" / "deepthink_config.json").read_text()
    config = served["deepthink-v1"].adapter.config
    assert config.method == "deepthink" and config.placeholder_token_ids() == config.demo_token_ids


def test_one_batch_mixes_methods_and_a_plain_prompt(setup, llm):
    family, _, model, tokenizer, served, _ = setup
    requests = [("prefix", 1), ("prompt", 2), ("deepthink", 3), (None, 1), ("past-kv", 0),
                ("ptuning", 3), ("prefix", 2), ("multitask", 1)]
    outputs = llm.generate([QUERIES[n] for _, n in requests],
                           [parity_params(name, num_greedy=NUM_GREEDY) for name, _ in requests],
                           use_tqdm=False)
    for (name, n), output in zip(requests, outputs):
        if name is None:
            ids = tokenizer.encode(QUERIES[n], add_special_tokens=True)  # vLLM's default
            reference = hf_reference(model, None, ids, num_greedy=NUM_GREEDY)
        else:
            ids = query(tokenizer, n)
            reference = served[name].reference(ids)
        assert_parity(output, reference, ids, label=f"{family} mixed batch {name} query {n}")


def test_plain_prompt_with_the_placeholder_ids_shares_no_cached_blocks(setup, llm):
    """The placeholder ids of an imported adapter are a fixed id (and BOS): a plain
    prompt made of the same ids must never read the adapter's cached blocks, nor write
    blocks the adapter then reads. The cache salt keeps them apart."""
    family, _, model, tokenizer, served, _ = setup
    adapter = served["prefix"].adapter
    assert adapter.prefix_len > BLOCK_SIZE  # block 0 holds placeholders only
    ids = query(tokenizer, 1)
    reference = served["prefix"].reference(ids)
    generation = dict(prompt_logprobs=None, num_greedy=NUM_GREEDY)
    for _ in range(2):  # adapter requests: their full blocks are now cached
        (output,) = llm.generate([QUERIES[1]], parity_params("prefix", **generation),
                                 use_tqdm=False)
        assert list(output.outputs[0].token_ids) == reference.greedy_tokens
    plain_ids = adapter.config.placeholder_token_ids() + ids
    plain_reference = hf_reference(model, None, plain_ids, num_greedy=NUM_GREEDY)
    assert plain_reference.greedy_tokens != reference.greedy_tokens, "need distinct answers"
    for attempt in (1, 2):
        (output,) = llm.generate([{"prompt_token_ids": plain_ids}],
                                 parity_params(None, **generation), use_tqdm=False)
        assert list(output.outputs[0].token_ids) == plain_reference.greedy_tokens
        full_blocks = (len(plain_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        # First time: nothing of the adapter's blocks is reused. Second time: its own
        # blocks are (prefix caching is on, so the first check could have failed).
        assert output.num_cached_tokens == (0 if attempt == 1 else full_blocks), attempt
    # The adapter is unchanged after the plain prompt cached blocks of the same ids.
    (output,) = llm.generate([QUERIES[1]], parity_params("prefix", num_greedy=NUM_GREEDY),
                             use_tqdm=False)
    assert_parity(output, reference, ids, label=f"{family} prefix after a plain placeholder prompt")
