"""Adapters added to a running `vllm.LLM`: add_adapter / remove_adapter, and names
resolved at request time from an adapter directory (engine_args(adapter_dirs=...))."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.engines import QUERIES, assert_parity, parity_params, shutdown, start_engine
from tests.helpers.references import hf_reference
from tests.helpers.tiny_models import load_tiny
import vllm_deepthink
from vllm_deepthink.plugin import api
from vllm_deepthink.plugin.request_checks import AdapterRequestError

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    built = {name: noisy_adapter(model, tokenizer, root / "built" / name, n, seed=n)
             for name, n in (("early", 40), ("late", 45), ("added", 33))}
    store = root / "store"
    store.mkdir()
    shutil.copytree(root / "built" / "early", store / "early")
    llm = start_engine(tiny_llama_dir, {}, adapter_dirs=[store], resident_gib=0.25)
    yield root, store, model, tokenizer, built, llm
    shutdown(llm)


def check(setup, name):
    _, _, model, tokenizer, built, llm = setup
    ids = tokenizer.encode(QUERIES[0], add_special_tokens=False)
    (output,) = llm.generate([QUERIES[0]], parity_params(name), use_tqdm=False)
    assert_parity(output, hf_reference(model, built[name], ids), ids, label=name)


def test_adapters_in_the_directory_at_start_and_dropped_in_later(setup):
    root, store, *_, llm = setup
    check(setup, "early")
    with pytest.raises(AdapterRequestError, match="unknown adapter 'late'"):
        check(setup, "late")
    shutil.copytree(root / "built" / "late", store / "late")   # no restart
    check(setup, "late")
    assert api.list_adapters(llm) == ["early", "late"]


def test_add_and_remove_on_a_running_engine(setup):
    root, *_, llm = setup
    vllm_deepthink.add_adapter(llm, "added", root / "built" / "added")
    check(setup, "added")
    vllm_deepthink.remove_adapter(llm, "added")
    with pytest.raises(AdapterRequestError, match="unknown adapter 'added'"):
        check(setup, "added")


def test_resolution_never_leaves_the_directory(setup):
    root, store, *_, llm = setup
    (store / "broken").mkdir()
    (store / "broken" / "deepthink_config.json").write_text("{}")
    with pytest.raises(AdapterRequestError, match="'broken' found at .* cannot be served"):
        check(setup, "broken")
    for name in ("../built/late", "built/late", ".."):  # would reach root/built/late
        with pytest.raises(AdapterRequestError):
            api.registry(llm).get(name)


def test_resident_budget_reaches_the_engine(setup):
    *_, llm = setup
    extra = llm.llm_engine.vllm_config.kv_transfer_config.kv_connector_extra_config
    assert extra["resident_gib"] == 0.25 and extra["adapter_dirs"] == [str(setup[1].resolve())]
