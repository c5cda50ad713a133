"""Adapter registry, request rewriting and the offline API, without an engine."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.tiny_models import load_tiny, make_tiny_model
from vllm_deepthink.plugin import protocol, request_checks, rewrite
from vllm_deepthink.plugin import registry as adapter_registry
from vllm_deepthink.plugin.protocol import AdapterNameError
from vllm_deepthink.format import AdapterFormatError


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return tiny_llama_dir, model, tokenizer


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    _, model, tokenizer = llama
    root = tmp_path_factory.mktemp("adapters")
    noisy_adapter(model, tokenizer, root / "a", 12, seed=1)
    noisy_adapter(model, tokenizer, root / "b", 20, seed=2)
    other_dir = make_tiny_model("llama", tmp_path_factory.mktemp("other"), seed=1)
    other, _ = load_tiny("llama", other_dir)
    noisy_adapter(other, tokenizer, root / "foreign", 12)
    return root


@pytest.mark.subprocess
def test_import_does_not_import_vllm():
    code = ("import sys, vllm_deepthink, vllm_deepthink.plugin.registry, "
            "vllm_deepthink.plugin.request_checks, vllm_deepthink.plugin.rewrite, "
            "vllm_deepthink.plugin.protocol, vllm_deepthink.plugin.connector.kv_layout; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_register_get_unregister(llama, adapters):
    registry = adapter_registry.AdapterRegistry(llama[0])
    info = registry.register("a", adapters / "a")
    assert info.prefix_len == 12 and len(info.placeholder_ids) == 12
    assert info.path == str((adapters / "a").resolve()) and len(info.digest) == 64
    assert registry.get("a") == info and registry.names() == ["a"]
    assert info.cache_salt() == f"deepthink:a:{info.digest}"
    assert info.cache_salt("user") == f"deepthink:a:{info.digest}:user"
    # Same name, other weights: another digest, so another salt.
    replaced = registry.register("a", adapters / "b")
    assert replaced.digest != info.digest and registry.get("a") == replaced
    assert registry.unregister("a") == replaced and registry.names() == []
    with pytest.raises(request_checks.AdapterRequestError, match="unknown adapter 'a'"):
        registry.get("a")
    with pytest.raises(request_checks.AdapterRequestError, match="no adapter named 'a'"):
        registry.unregister("a")


def test_registry_refuses_foreign_adapter_and_records_start_failures(llama, adapters):
    registry = adapter_registry.AdapterRegistry(llama[0])
    with pytest.raises(AdapterFormatError, match="embedding_sha256"):
        registry.register("foreign", adapters / "foreign")
    assert registry.names() == []
    registry.register_at_start({"a": str(adapters / "a"), "foreign": str(adapters / "foreign"),
                                "missing": str(adapters / "nope")})
    assert registry.names() == ["a"]
    assert set(registry.failed()) == {"foreign", "missing"}
    with pytest.raises(request_checks.AdapterRequestError,
                       match="'foreign' failed to load at engine start.*embedding_sha256"):
        registry.get("foreign")


def test_registry_is_thread_safe(llama, adapters):
    registry = adapter_registry.AdapterRegistry(llama[0])
    names = [f"n{i}" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: registry.register(n, adapters / "a"), names))
    assert registry.names() == sorted(names)


def test_query_token_ids(llama):
    tokenizer = llama[2]
    text = "Review: a charming film\nSentiment:"
    plain = tokenizer.encode(text, add_special_tokens=False)
    with_bos = tokenizer.encode(text, add_special_tokens=True)
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == plain
    assert rewrite.query_token_ids(text, tokenizer)[0] == plain
    # A rendered text prompt (the renderer added BOS) is tokenized again without it.
    rendered = {"type": "token", "prompt_token_ids": with_bos, "prompt": text}
    assert rewrite.query_token_ids(rendered, tokenizer) == (plain, text, None)
    # Token ids are used as given, BOS included.
    assert rewrite.query_token_ids({"type": "token", "prompt_token_ids": with_bos},
                                    tokenizer)[0] == with_bos
    assert rewrite.query_token_ids({"prompt": text, "cache_salt": "s"}, tokenizer)[2] == "s"
    # The renderer keeps no text for an empty prompt, only the special tokens.
    rendered_empty = {"type": "token", "prompt_token_ids": [tokenizer.bos_token_id]}
    for empty in ("", {"type": "token", "prompt_token_ids": []}, rendered_empty):
        with pytest.raises(request_checks.AdapterRequestError, match="zero tokens"):
            rewrite.query_token_ids(empty, tokenizer)
    with pytest.raises(request_checks.AdapterRequestError, match="'embeds'"):
        rewrite.query_token_ids({"type": "embeds"}, tokenizer)


def test_a_rendered_text_prompt_is_not_tokenized_again(llama, monkeypatch):
    """The tokenizer's special-token frame is learnt once; then a rendered text prompt
    whose text cannot tokenize to the frame's tokens loses the renderer's BOS without a
    tokenization. A text that holds the BOS string, and a raw prompt with both text and
    ids, are checked against the tokenizer's own tokenization as before."""
    tokenizer = llama[2]
    text = "Review: a film of few words\nSentiment:"
    plain = tokenizer.encode(text, add_special_tokens=False)
    with_bos = tokenizer.encode(text, add_special_tokens=True)
    grown = {"type": "token", "prompt_token_ids": with_bos + [7, 8], "prompt": text}
    assert rewrite.query_token_ids(grown, tokenizer) == (plain + [7, 8], text, None)
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(k) or encode(*a, **k))

    def query(ids, prompt_text=text, kind="token"):
        return rewrite.query_token_ids({"type": kind, "prompt_token_ids": ids,
                                        "prompt": prompt_text}, tokenizer)[0]

    assert query(with_bos + [7, 8]) == plain + [7, 8]
    assert query(with_bos[2:]) == with_bos[2:]   # truncated on the left: as given
    assert query(with_bos[:4]) == plain[:3]      # on the right: the renderer's BOS goes
    assert query(plain) == plain                 # rendered without special tokens
    assert calls == []
    # A text that holds the BOS string tokenizes to BOS itself: that one stays.
    bos_text = tokenizer.bos_token + text
    own = tokenizer.encode(bos_text, add_special_tokens=False)
    assert own[0] == tokenizer.bos_token_id
    assert query([tokenizer.bos_token_id, *own], bos_text) == own
    assert query(own, bos_text) == own
    assert query(with_bos, text.upper().replace("REVIEW", tokenizer.bos_token.upper())) \
        == with_bos                              # case-insensitive: checked the long way
    assert {"add_special_tokens": False} in calls
    calls.clear()
    # A raw prompt with text and ids (no "type"): ids that are not the text's are kept.
    assert rewrite.query_token_ids({"prompt_token_ids": with_bos[:4], "prompt": text},
                                   tokenizer)[0] == with_bos[:4]
    assert calls == [{"add_special_tokens": False}, {"add_special_tokens": True}]


def test_rewrite_request(llama, adapters):
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    tokenizer = llama[2]
    info = adapter_registry.AdapterRegistry(llama[0]).register("a", adapters / "a")
    user_params = SamplingParams(prompt_logprobs=0, max_tokens=3,
                                 extra_args={protocol.ADAPTER_ARG: "a",
                                             "kv_transfer_params": {"other": 1}})
    assert user_params.skip_reading_prefix_cache
    engine_input, params = rewrite.rewrite_request(
        info, {"type": "token", "prompt_token_ids": [5, 6], "arrival_time": 1.0,
               "cache_salt": "u"}, user_params, tokenizer, max_model_len=64)
    assert engine_input == {"type": "token", "prompt_token_ids": list(info.placeholder_ids) + [5, 6],
                            "cache_salt": info.cache_salt("u"), "arrival_time": 1.0}
    assert params.extra_args["kv_transfer_params"] == {"other": 1,
                                                       "deepthink": info.transfer_params()}
    assert params.skip_reading_prefix_cache is False
    assert user_params.extra_args["kv_transfer_params"] == {"other": 1}, "caller's params changed"
    with pytest.raises(request_checks.AdapterRequestError, match="max_model_len=14"):
        rewrite.rewrite_request(info, "Review: a", user_params, tokenizer, max_model_len=14)
    # Only the rewrite writes our kv_transfer_params entry: a request carrying it is refused.
    with pytest.raises(request_checks.AdapterRequestError, match="reserved"):
        request_checks.check_request({"type": "token", "prompt_token_ids": [5, 6]}, params)
    assert request_checks.check_request({"type": "token", "prompt_token_ids": [5, 6]},
                                  user_params) == "a"


def test_engine_args_and_sampling_params(adapters):
    pytest.importorskip("vllm")
    import vllm_deepthink
    from vllm.config import KVTransferConfig

    kwargs = vllm_deepthink.engine_args(adapters={"a": adapters / "a"}, dtype="float32",
                                        enable_prefix_caching=False)
    assert kwargs["dtype"] == "float32" and kwargs["enable_prefix_caching"] is False
    config = kwargs["kv_transfer_config"]
    assert config.kv_connector == protocol.CONNECTOR_NAME
    assert config.kv_connector_extra_config == {"adapters": {"a": str((adapters / "a").resolve())}}
    assert vllm_deepthink.engine_args()["enable_prefix_caching"] is True

    merged = vllm_deepthink.engine_args(adapters={"a": adapters / "a"}, kv_transfer_config={
        "kv_connector": protocol.CONNECTOR_NAME, "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"adapters": {"b": str(adapters / "b")}}})
    assert sorted(merged["kv_transfer_config"].kv_connector_extra_config["adapters"]) == ["a", "b"]
    with pytest.raises(ValueError, match="one connector per engine"):
        vllm_deepthink.engine_args(kv_transfer_config=KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both"))
    with pytest.raises(ValueError, match="given twice"):
        vllm_deepthink.engine_args(adapters={"a": adapters / "a"}, kv_transfer_config={
            "kv_connector": protocol.CONNECTOR_NAME, "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"adapters": {"a": str(adapters / "b")}}})
    with pytest.raises(AdapterFormatError, match="no such adapter directory"):
        vllm_deepthink.engine_args(adapters={"x": adapters / "nope"})

    params = vllm_deepthink.sampling_params(adapter="a", max_tokens=4,
                                            extra_args={"keep": 1})
    assert params.max_tokens == 4 and params.extra_args == {"keep": 1, "deepthink_adapter": "a"}
    for bad in (" a", "../x", "a/b", ""):
        with pytest.raises(AdapterNameError, match="invalid Deep-Thinking adapter name"):
            vllm_deepthink.sampling_params(adapter=bad)


def test_registry_for_builds_one_registry_per_engine(llama, adapters):
    from types import SimpleNamespace

    def config(model_dir, connector=protocol.CONNECTOR_NAME, engine_id="e1"):
        kv = SimpleNamespace(kv_connector=connector, engine_id=engine_id,
                             kv_connector_extra_config={"adapters": {"a": str(adapters / "a")}})
        return SimpleNamespace(kv_transfer_config=kv,
                               model_config=SimpleNamespace(model=str(model_dir), revision=None),
                               parallel_config=SimpleNamespace(tensor_parallel_size=1))

    with pytest.raises(request_checks.AdapterRequestError, match="not started for Deep-Thinking"):
        adapter_registry.registry_for(config(llama[0], connector="ExampleConnector"))
    first = adapter_registry.registry_for(config(llama[0]))
    assert first.names() == ["a"] and adapter_registry.registry_for(config(llama[0])) is first
    other = adapter_registry.registry_for(config(llama[0], engine_id="e2"))
    assert other is not first and adapter_registry.registry_for(config(llama[0])) is first


def test_registry_for_refuses_adapters_over_the_resident_budget(llama, adapters):
    """--deepthink-resident-gib reaches the registry: an adapter loaded at runtime that
    a worker could never hold is refused, naming the budget (a 400 on the load endpoint)."""
    from types import SimpleNamespace

    kv = SimpleNamespace(kv_connector=protocol.CONNECTOR_NAME, engine_id="tiny-budget",
                         kv_connector_extra_config={"resident_gib": 1 / (1 << 30)})
    registry = adapter_registry.registry_for(SimpleNamespace(
        kv_transfer_config=kv, model_config=SimpleNamespace(model=str(llama[0]), revision=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=1)))
    with pytest.raises(request_checks.AdapterRequestError,
                       match="'a' .* more than the resident-adapter budget of 1 bytes"):
        registry.register("a", adapters / "a")
    assert registry.names() == []


def test_a_registered_resolver_is_consulted_by_new_engines(llama, adapters):
    """register_resolver (another adapter source, like vLLM's LoRA resolver plugins):
    an engine started afterwards serves NAME from it, validated like any adapter."""
    from types import SimpleNamespace

    from vllm_deepthink.plugin import resolvers

    class Mapping:
        def resolve(self, name):
            return {"fresh": str(adapters / "b"), "alien": str(adapters / "foreign")}.get(name)

    kv = SimpleNamespace(kv_connector=protocol.CONNECTOR_NAME, engine_id="resolver-test",
                         kv_connector_extra_config={})
    config = SimpleNamespace(kv_transfer_config=kv,
                             model_config=SimpleNamespace(model=str(llama[0]), revision=None),
                             parallel_config=SimpleNamespace(tensor_parallel_size=1))
    with pytest.raises(TypeError, match="resolve\\(name\\) method"):
        resolvers.register_resolver("bad", object())
    resolvers.register_resolver("test-mapping", Mapping())
    try:
        registry = adapter_registry.registry_for(config)
        assert registry.names() == [] and registry.lookup("nosuch") is None
        assert registry.lookup("fresh").prefix_len == 20
        with pytest.raises(request_checks.AdapterRequestError,
                           match="'alien' found at .* cannot be served"):
            registry.lookup("alien")
    finally:
        resolvers._registered.pop("test-mapping")


@pytest.mark.subprocess
def test_hub_resolver_finds_org_name_in_the_hub_cache_offline(llama, adapters, tmp_path):
    """HubResolver("org"): NAME -> org/NAME from a real hub-cache layout, offline (a fresh
    process: huggingface_hub reads its environment at import)."""
    import os

    from tests.helpers import REPO_ROOT
    from tests.helpers.hub_cache import offline_env, publish

    llama_dir = llama[0]
    cache = tmp_path / "cache"
    main = publish(adapters / "a", cache, "org/sst2")
    v2 = publish(adapters / "b", cache, "org/sst2", refs=("v2",))
    publish(llama_dir, cache, "org/not-an-adapter")  # a model repository
    code = ("from vllm_deepthink.plugin.resolvers import HubResolver\n"
            "from vllm_deepthink.plugin.registry import AdapterRegistry\n"
            "r, pinned = HubResolver('org'), HubResolver('org', revision='v2')\n"
            "print(r.resolve('sst2'), pinned.resolve('sst2'), r.resolve('missing'),\n"
            "      r.resolve('not-an-adapter'), r.resolve('../x'), r.cached_names())\n"
            f"registry = AdapterRegistry({str(llama_dir)!r}, resolvers=[pinned])\n"
            "print(registry.lookup('sst2').prefix_len)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **offline_env(cache),
                                 "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.strip().splitlines()
    snapshots = cache / "models--org--sst2" / "snapshots"
    assert first.split()[:5] == [str(snapshots / main), str(snapshots / v2), "None", "None",
                                 "None"]
    assert first.split()[5] == "3"  # sst2, missing, not-an-adapter: remembered
    assert second == "20"  # v2 holds adapter b (L=20), main holds a (L=12)
