"""End to end: `vllm-deepthink import peft|past-kv` then `vllm serve --deepthink-adapter`
(one real server per family: tiny Llama with RoPE and GQA, tiny GPT-2 with learned
positions), answers checked against PeftModel / HF over HTTP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")

from tests.helpers.references import hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer, openai_client  # noqa: E402
from tests.helpers.peft_adapters import (load_reference_model, make_peft_adapter,  # noqa: E402
                                         peft_reference)
from tests.helpers.tiny_models import load_tiny  # noqa: E402
from vllm_deepthink.apps import cli  # noqa: E402
from vllm_deepthink.format import DeepThinkAdapter  # noqa: E402

pytestmark = pytest.mark.engine

TOLERANCE = 1e-4
NUM_GREEDY = 6
QUERY = "Review: contains no wit , only labored gags\nSentiment:"
# served name -> (PEFT kind, num_virtual_tokens)
PEFT = {"my-prefix": ("prefix", 12), "my-prefix-proj": ("prefix-proj", 5),
        "my-prompt": ("prompt", 6), "my-ptuning": ("ptuning", 4)}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request, tmp_path_factory):
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    family = request.param
    root = tmp_path_factory.mktemp(f"import-serve-{family}")
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model, tokenizer = load_tiny(family, model_dir)
    references = {}
    for i, (name, (kind, virtual)) in enumerate(PEFT.items()):
        source = make_peft_adapter(model_dir, kind, root / "peft" / name,
                                   num_virtual_tokens=virtual, seed=20 + i)
        assert cli.main(["import", "peft", str(source), "--model", str(model_dir),
                         "--out", str(root / "store" / name)]) == 0
        pm = load_reference_model(model_dir, source)
        references[name] = lambda ids, pm=pm: peft_reference(
            pm, [tokenizer.bos_token_id] + ids, 1, num_greedy=NUM_GREEDY)
    # past-kv: the K/V of one of the imported adapters' own weights file.
    kv_file = root / "store" / "my-prefix" / "deepthink_model.safetensors"
    assert cli.main(["import", "past-kv", str(kv_file), "--model", str(model_dir),
                     "--out", str(root / "store" / "my-kv")]) == 0
    kv = DeepThinkAdapter.from_pretrained(root / "store" / "my-kv")
    references["my-kv"] = lambda ids: hf_reference(model, kv, ids, num_greedy=NUM_GREEDY)
    args = []
    for name in references:
        args += ["--deepthink-adapter", f"{name}={root / 'store' / name}"]
    server = VllmServer(model_dir, args, log_path=root / "server.log")
    try:
        server.start()
        server.wait_until_healthy()
        yield SimpleNamespace(client=openai_client(server), tokenizer=tokenizer,
                              references=references, model=model, family=family)
    finally:
        server.stop()


@pytest.mark.parametrize("name", [*PEFT, "my-kv"])
def test_imported_adapter_over_http_matches_peft(served, name):
    ids = served.tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    reference = served.references[name](ids)
    response = served.client.completions.create(
        model=name, prompt=QUERY, max_tokens=NUM_GREEDY, temperature=0.0, echo=True,
        logprobs=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert response.model == name
    choice = response.choices[0]
    logprobs = choice.logprobs.token_logprobs
    assert len(logprobs) == len(ids) + NUM_GREEDY and logprobs[0] is None
    diff = max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs)
    print(f"[peft parity vllm serve] {served.family} {name}: max |dlogprob| {diff:.2e}")
    assert diff <= TOLERANCE, f"{name}: query logprobs differ from PeftModel by {diff}"
    assert choice.token_ids == reference.greedy_tokens
    assert response.usage.prompt_tokens == len(ids)


def test_models_lists_imported_adapters(served):
    ids = {card.id for card in served.client.models.list().data}
    assert {*PEFT, "my-kv"} <= ids
