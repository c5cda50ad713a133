"""Issue 11, the engine-free half of the security contract: the plugin never weakens a
vLLM server.

No engine starts here: a real vLLM `InputProcessor` built from a `VllmConfig` (units
Llama, with and without the DeepThink connector, LoRA enabled) runs the frontend patch
exactly as `LLM` and `AsyncLLM` call it; scheduler- and worker-side code runs on
stand-ins of its `self`. Each test names the issue item it guards. The HTTP half is
tests/plugin/test_security_http.py and test_security_plain.py.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import threading
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.http_probe import QUERY
from tests.helpers.tiny_models import load_tiny

vllm = pytest.importorskip("vllm")

from vllm import EngineArgs, SamplingParams  # noqa: E402
from vllm.entrypoints.serve import create_error_response  # noqa: E402
from vllm.exceptions import VLLMClientError  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.v1.engine.input_processor import InputProcessor  # noqa: E402

import vllm_deepthink  # noqa: E402
from vllm_deepthink import plugin  # noqa: E402
from vllm_deepthink.format import AdapterFormatError  # noqa: E402
from vllm_deepthink.plugin import patches, protocol, request_checks, rewrite  # noqa: E402
from vllm_deepthink.plugin import registry as adapter_registry  # noqa: E402
from vllm_deepthink.plugin.serving import models as serving_models  # noqa: E402
from vllm_deepthink.plugin.patches import engine as engine_patches  # noqa: E402

GENERATE = ("generate",)


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()  # the patches, as in every vLLM process


@pytest.fixture(scope="module")
def units(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-units")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    a1 = root / "a1"
    adapter = noisy_adapter(model, tokenizer, a1, 40, seed=1)
    return SimpleNamespace(root=root, model_dir=tiny_llama_dir, model=model,
                           tokenizer=tokenizer, a1=a1, adapter=adapter)


def processor(units, **engine_kwargs) -> InputProcessor:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = EngineArgs(model=str(units.model_dir), dtype="float32", max_model_len=512,
                      enforce_eager=True, **engine_kwargs)
    return InputProcessor(args.create_engine_config())


@pytest.fixture(scope="module")
def plain(units) -> InputProcessor:
    """The frontend of an engine without the DeepThink connector (plugin installed)."""
    return processor(units)


@pytest.fixture(scope="module")
def served(units) -> InputProcessor:
    """The frontend of an engine serving adapter a1, with LoRA enabled."""
    return processor(units, enable_lora=True, max_lora_rank=8,
                     **vllm_deepthink.engine_args(adapters={"a1": units.a1}))


def tokens(ids, **fields) -> dict:
    return {"type": "token", "prompt_token_ids": list(ids), **fields}


def run(ip: InputProcessor, prompt, params, **kwargs):
    return ip.process_inputs("req-0", prompt, params, supported_tasks=GENERATE, **kwargs)


def refusal(call) -> tuple[int, str, str | None]:
    """(HTTP status, message, param) vLLM's server answers for the exception of call()."""
    with pytest.raises(VLLMClientError) as info:
        call()
    assert isinstance(info.value, request_checks.AdapterRequestError), "offline callers catch this"
    error = create_error_response(info.value).error
    return error.code, error.message, error.param


# Values a client can put into extra_args; only a plain int >= 0 is a scoring position.
HOSTILE = ["x", math.inf, -math.inf, math.nan, [1], {"a": 1}, True, 1.5, "10", -1, None]


def stand_in_request(params, kv_transfer_params=None):
    return SimpleNamespace(sampling_params=params, kv_transfer_params=kv_transfer_params)


# ------------------------------------------------------------------ item 1

@pytest.mark.parametrize("value", HOSTILE + [2 ** 40, 2 ** 63 - 1], ids=repr)
def test_item1_local_hit_cap_never_raises(value):
    """It runs inside Scheduler.schedule: a bad value means "no cap", never an exception
    (today's int(value) killed the engine core for "x", 1e309, NaN, [1])."""
    request = stand_in_request(SamplingParams(
        prompt_logprobs=1, extra_args={protocol.SCORED_FROM_ARG: value}))
    cap = engine_patches.local_hit_cap(request, 32)
    if type(value) is int and value >= 0:
        assert cap == max(0, value - 1) // 32 * 32
    else:
        assert cap is None
    for entry in ({"prefix_len": value}, value, {"name": "a1", "path": "/x", "digest": "0" * 64,
                                                "prefix_len": value}):
        forged = stand_in_request(SamplingParams(prompt_logprobs=1),
                                  {protocol.PARAMS_KEY: entry})
        cap = engine_patches.local_hit_cap(forged, 32)
        assert cap is None or (type(value) is int and value > 0)


def test_item1_local_hit_cap_still_caps_a_valid_value():
    request = stand_in_request(SamplingParams(
        prompt_logprobs=0, extra_args={protocol.SCORED_FROM_ARG: 100}))
    assert engine_patches.local_hit_cap(request, 32) == 96


def scheduler(connector_name, manager):
    kv = None if connector_name is None else SimpleNamespace(kv_connector=connector_name)
    return SimpleNamespace(connector=None, kv_cache_manager=manager, block_size=32,
                           vllm_config=SimpleNamespace(kv_transfer_config=kv))


class StandInManager:
    """KVCacheManager stand-in: a local hit of 100 tokens; records truncations."""

    def __init__(self):
        self.truncated = []

    def get_computed_blocks(self, request):
        return "BLOCKS", 100, 0

    def truncate_computed_blocks(self, blocks, num_computed_tokens):
        self.truncated.append(num_computed_tokens)
        return "TRUNCATED"


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_item1_scheduler_hit_never_raises_on_a_bad_scoring_position(value):
    from vllm.v1.core.sched.scheduler import Scheduler

    request = stand_in_request(SamplingParams(
        prompt_logprobs=1, extra_args={protocol.SCORED_FROM_ARG: value}))
    manager = StandInManager()
    hit = Scheduler._get_local_prefix_cache_hit(scheduler(protocol.CONNECTOR_NAME, manager),
                                                request)
    assert hit == ("BLOCKS", 100, 0, False) and manager.truncated == []


def test_item1_scheduler_caps_only_with_our_connector():
    from vllm.v1.core.sched.scheduler import Scheduler

    request = stand_in_request(SamplingParams(
        prompt_logprobs=0, extra_args={protocol.SCORED_FROM_ARG: 70}))
    ours = StandInManager()
    assert Scheduler._get_local_prefix_cache_hit(
        scheduler(protocol.CONNECTOR_NAME, ours), request) == ("TRUNCATED", 64, 0, False)
    assert ours.truncated == [64]
    for other in (None, "ExampleConnector"):
        manager = StandInManager()
        assert Scheduler._get_local_prefix_cache_hit(
            scheduler(other, manager), request) == ("BLOCKS", 100, 0, False)
        assert manager.truncated == []


@pytest.mark.parametrize("value", [v for v in HOSTILE if v is not None], ids=repr)
def test_item1_frontend_refuses_a_bad_scoring_position(served, value):
    """The scorer may set it offline; only a plain int >= 0 passes, anything else is a 400."""
    params = SamplingParams(prompt_logprobs=0, extra_args={protocol.SCORED_FROM_ARG: value})
    status, message, param = refusal(lambda: run(served, tokens([5, 6, 7, 8]), params))
    assert status == 400 and protocol.SCORED_FROM_ARG in message
    assert param == protocol.SCORED_FROM_ARG


def test_item1_frontend_accepts_the_scorers_value(served):
    params = SamplingParams(prompt_logprobs=0, skip_reading_prefix_cache=False,
                            extra_args={protocol.SCORED_FROM_ARG: 3})
    request = run(served, tokens([5, 6, 7, 8]), params)
    assert request.prompt_token_ids == [5, 6, 7, 8]
    assert request.sampling_params.extra_args == {protocol.SCORED_FROM_ARG: 3}


def test_item1_unknown_plugin_keys_are_refused(served):
    params = SamplingParams(extra_args={"deepthink_adaptor": "a1"})   # a typo
    status, message, _ = refusal(lambda: run(served, tokens([5, 6]), params))
    assert status == 400 and "deepthink_adaptor" in message


# ------------------------------------------------------------------ item 2

def test_item2_attention_free_engine_takes_vllms_path():
    """An attention-free model's KV cache has no group: today's patch read
    kv_cache_groups[0] on every request and crashed the engine core."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import KVCacheConfig

    manager = KVCacheManager(KVCacheConfig(num_blocks=1, kv_cache_tensors=[],
                                           kv_cache_groups=[]),
                             max_model_len=64, scheduler_block_size=16, hash_block_size=16,
                             enable_caching=False)
    request = SimpleNamespace(
        sampling_params=SamplingParams(prompt_logprobs=1,
                                       extra_args={protocol.SCORED_FROM_ARG: "x"}),
        kv_transfer_params=None, skip_reading_prefix_cache=True)
    blocks, num_computed, boundary, diverged = Scheduler._get_local_prefix_cache_hit(
        scheduler(None, manager), request)
    assert (blocks, num_computed, boundary, diverged) == (
        manager.empty_kv_cache_blocks, 0, 0, False)


def test_item2_input_processor_is_vllms_own_without_the_connector(plain):
    """Stock vLLM passes these through (the engine ignores what it does not know)."""
    vllm_process_inputs = patches.original(InputProcessor, "process_inputs")
    extra = {protocol.ADAPTER_ARG: "a1", protocol.SCORED_FROM_ARG: "x",
             "kv_transfer_params": {protocol.PARAMS_KEY: {"prefix_len": "x", "path": "/etc"}}}
    prompt = tokens([5, 6, 7], cache_salt="deepthink:a1:" + "0" * 64)
    ours = run(plain, prompt, SamplingParams(prompt_logprobs=1, extra_args=dict(extra)))
    stock = vllm_process_inputs(plain, "req-0", prompt,
                                SamplingParams(prompt_logprobs=1, extra_args=dict(extra)),
                                supported_tasks=GENERATE)
    assert ours.prompt_token_ids == stock.prompt_token_ids == [5, 6, 7]
    assert ours.cache_salt == stock.cache_salt
    assert ours.sampling_params.extra_args == stock.sampling_params.extra_args


@pytest.mark.parametrize("prefix_len", [2, "x"])
def test_item2_request_state_ignores_an_entry_the_frontend_did_not_write(plain, prefix_len):
    """A client's kv_transfer_params entry on a server without the connector: outputs are
    vLLM's (today: the first 2 prompt tokens vanished, or int("x") raised)."""
    from vllm.v1.engine.output_processor import RequestState

    vllm_process_inputs = patches.original(InputProcessor, "process_inputs")
    params = SamplingParams(extra_args={"kv_transfer_params": {protocol.PARAMS_KEY: {
        "name": "a1", "path": "/x", "digest": "0" * 64, "prefix_len": prefix_len}}})
    request = vllm_process_inputs(plain, "req-0", tokens([5, 6, 7, 8]), params,
                                  supported_tasks=GENERATE)
    request.external_req_id = "req-0"
    state = RequestState.from_new_request(
        tokenizer=None, request=request, prompt=None, parent_req=None, request_index=0,
        queue=None, log_stats=False, stream_interval=1)
    assert list(state.prompt_token_ids) == [5, 6, 7, 8]
    assert type(state) is RequestState


def test_item2_request_state_is_query_only_for_the_frontends_entry(served):
    from vllm.v1.engine.output_processor import RequestState

    request = run(served, tokens([5, 6, 7]), vllm_deepthink.sampling_params(adapter="a1"))
    request.external_req_id = "req-0"
    state = RequestState.from_new_request(
        tokenizer=None, request=request, prompt=None, parent_req=None, request_index=0,
        queue=None, log_stats=False, stream_interval=1)
    assert list(state.prompt_token_ids) == [5, 6, 7]


# ------------------------------------------------------------------ item 3

def test_item3_adapter_errors_are_vllm_client_errors_with_their_message(served):
    """AsyncLLM.generate re-raises VLLMClientError as is (a 400 with the message); any
    other exception becomes EngineGenerateError, a 500 with an empty message."""
    status, message, param = refusal(
        lambda: run(served, tokens([]), vllm_deepthink.sampling_params(adapter="a1")))
    assert status == 400 and "zero tokens" in message and param == "prompt"
    status, message, _ = refusal(
        lambda: run(served, tokens([5] * 480), vllm_deepthink.sampling_params(adapter="a1")))
    assert status == 400 and "max_model_len" in message


def test_item3_unknown_adapter_is_404(served):
    status, message, _ = refusal(
        lambda: run(served, tokens([5, 6]), vllm_deepthink.sampling_params(adapter="nosuch")))
    assert status == 404 and "nosuch" in message


@pytest.mark.parametrize("kv_params", ["x", 1, [1]], ids=repr)
def test_item3_kv_transfer_params_must_be_an_object(served, kv_params):
    """Stock vLLM's output processor calls .get() on it (an AttributeError: a 500)."""
    status, message, _ = refusal(lambda: run(
        served, tokens([5, 6]), SamplingParams(extra_args={"kv_transfer_params": kv_params})))
    assert status == 400 and "kv_transfer_params" in message


@pytest.mark.parametrize("entry", [{"prefix_len": 40}, "x", {
    "name": "a1", "path": "/etc", "digest": "0" * 64, "prefix_len": 40}], ids=repr)
def test_item3_forged_entry_is_refused(served, entry):
    params = SamplingParams(extra_args={"kv_transfer_params": {protocol.PARAMS_KEY: entry}})
    status, message, param = refusal(lambda: run(served, tokens([5, 6]), params))
    assert status == 400 and "reserved" in message and param == "kv_transfer_params"


# ------------------------------------------------------------------ item 4

def test_item4_lora_and_adapter_together_are_refused(served):
    lora = LoRARequest(lora_name="l1", lora_int_id=1, lora_path="/nonexistent")
    status, message, _ = refusal(lambda: run(
        served, tokens([5, 6]), vllm_deepthink.sampling_params(adapter="a1"),
        lora_request=lora))
    assert status == 400 and "LoRA" in message and "'a1'" in message


@pytest.mark.parametrize("fields", [
    {"vllm_xargs": {"deepthink_adapter": "a1"}}, {"vllm_xargs": {"deepthink_scored_from": 3}},
    {"vllm_xargs": {"deepthink_anything": 1}},
    {"kv_transfer_params": {"deepthink": {"prefix_len": 40}}},
    {"cache_salt": "deepthink:a1:" + "0" * 64}], ids=lambda f: next(iter(f)))
def test_item4_reserved_http_fields(fields, units, monkeypatch):
    """What the _check_model patch answers before a request is rendered (a 400)."""
    from vllm_deepthink.plugin.serving import models as serving

    monkeypatch.setattr(serving, "registry_of", lambda models: object())
    request = SimpleNamespace(**{"vllm_xargs": None, "kv_transfer_params": None,
                                 "cache_salt": None, **fields})
    error = serving.reserved_field_error(None, request)
    assert error is not None and error.error.code == 400, error
    assert next(iter(fields)) in error.error.message or "deepthink" in error.error.message
    fine = SimpleNamespace(vllm_xargs={"foo": 1}, kv_transfer_params={"other": 1},
                           cache_salt="tenant")
    assert serving.reserved_field_error(None, fine) is None
    monkeypatch.setattr(serving, "registry_of", lambda models: None)   # no connector: inert
    assert serving.reserved_field_error(None, request) is None


# ------------------------------------------------------------------ item 5

@pytest.mark.parametrize("salt", ["deepthink:", "deepthink:a1:" + "0" * 64, "deepthink:x"])
def test_item5_client_salts_in_the_deepthink_namespace_are_refused(served, salt):
    for params in (SamplingParams(), vllm_deepthink.sampling_params(adapter="a1")):
        status, message, param = refusal(
            lambda: run(served, tokens([5, 6], cache_salt=salt), params))
        assert status == 400 and "cache_salt" in message and param == "cache_salt"


def test_item5_other_salts_still_work(served, units):
    request = run(served, tokens([5, 6], cache_salt="tenant"), SamplingParams())
    assert request.cache_salt == "tenant"
    request = run(served, tokens([5, 6], cache_salt="tenant"),
                  vllm_deepthink.sampling_params(adapter="a1"))
    assert request.cache_salt == f"deepthink:a1:{units.adapter.digest}:tenant"
    assert request.prompt_token_ids == list(units.adapter.config.demo_token_ids) + [5, 6]


# ------------------------------------------------------------------ item 6

def test_item6_our_connector_does_not_turn_on_embedding_inputs():
    """vLLM enables (tensor-optional) embedding inputs for every kv_role="kv_consumer";
    for our connector they resolve as without a connector."""
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.config.multimodal import MultiModalConfig

    def resolved(connector: str | None, enable_mm_embeds: bool = False):
        mm = MultiModalConfig(enable_mm_embeds=enable_mm_embeds)
        kv = (None if connector is None else
              KVTransferConfig(kv_connector=connector, kv_role="kv_consumer"))
        config = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=mm),
                                 ec_transfer_config=None, kv_transfer_config=kv)
        VllmConfig._resolve_mm_embedding_inputs(config)
        return mm.enable_mm_embeds, mm.allow_missing_mm_embeddings

    assert resolved(protocol.CONNECTOR_NAME) == resolved(None) == (False, False)
    assert resolved(protocol.CONNECTOR_NAME, enable_mm_embeds=True) == (True, False)
    assert resolved("NixlConnector") == (True, True)  # vLLM's rule for real consumers


def test_item6_a_multimodal_engine_with_our_connector_takes_no_embedding_inputs(units):
    """A real engine configuration of a multimodal model (tiny LLaVA): with our connector
    embedding inputs stay off, as without a connector; another consumer gets vLLM's rule."""
    from vllm.config import KVTransferConfig

    from tests.helpers.tiny_models import make_tiny_llava_config

    model = make_tiny_llava_config(units.root / "tiny-llava")

    def resolved(**kwargs):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        config = EngineArgs(model=str(model), dtype="float32", max_model_len=256,
                            enforce_eager=True, **kwargs).create_engine_config()
        mm = config.model_config.multimodal_config
        assert mm is not None, "the tiny LLaVA is not multimodal"
        return mm.enable_mm_embeds, mm.allow_missing_mm_embeddings

    assert resolved(**vllm_deepthink.engine_args()) == resolved() == (False, False)
    assert resolved(kv_transfer_config=KVTransferConfig(
        kv_connector="ExampleConnector", kv_role="kv_consumer")) == (True, True)


# ------------------------------------------------------------------ item 7

def test_item7_bos_strip_is_a_prefix_match(units):
    """Beam search re-submits the rendered ids (with BOS) plus the ids it grew."""
    tok = units.tokenizer
    with_bos = tok(QUERY)["input_ids"]
    plain_ids = tok(QUERY, add_special_tokens=False)["input_ids"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == plain_ids
    cases = [
        (with_bos, plain_ids),                          # step 1 (worked before)
        (with_bos + [7, 8], plain_ids + [7, 8]),        # step 3 of beam search
        (with_bos[3:], with_bos[3:]),                   # truncated: kept as given
    ]
    for ids, expected in cases:
        prompt = {"type": "token", "prompt": QUERY, "prompt_token_ids": ids}
        assert rewrite.query_token_ids(prompt, tok)[0] == expected
    # Token ids without text are used as given, BOS included.
    assert rewrite.query_token_ids(tokens(with_bos + [7]), tok)[0] == with_bos + [7]


# ------------------------------------------------------------------ item 8

def test_item8_resident_adapters_are_host_memory_pinned_on_accelerators():
    from vllm_deepthink.plugin.connector.resident import pin_memory_for

    cuda = SimpleNamespace(device_type="cuda", is_pin_memory_available=lambda: True)
    wsl = SimpleNamespace(device_type="cuda", is_pin_memory_available=lambda: False)
    cpu = SimpleNamespace(device_type="cpu", is_pin_memory_available=lambda: True)
    assert [pin_memory_for(p) for p in (cuda, wsl, cpu)] == [True, False, False]


def test_item8_a_load_copies_only_its_rows_to_the_device(units):
    """The write hands do_kv_cache_update rows [start, end) on the cache's device; the
    resident copy stays in host memory."""
    from vllm_deepthink.plugin.connector.resident import ResidentAdapters
    from vllm_deepthink.plugin.connector.scheduler import (AdapterLoad,
                                                           DeepThinkConnectorMetadata)
    from vllm_deepthink.plugin.connector.worker import WorkerSide

    store = ResidentAdapters(torch.float32, 1, 0)
    resident = store.load("a1", str(units.a1))
    seen = []

    class Impl:
        def do_kv_cache_update(self, layer, key, value, kv_cache, slots):
            seen.append((tuple(key.shape), key.device.type, value.device.type, len(slots)))

    worker = WorkerSide.__new__(WorkerSide)
    worker._start(store, 32)
    worker._layers = {f"model.layers.{i}.self_attn.attn": (SimpleNamespace(
        impl=Impl(), kv_cache=torch.empty(0, device="meta"), num_kv_heads=2, head_size=64), i)
        for i in range(len(resident.keys))}
    load = AdapterLoad("r", "a1", str(units.a1), resident.digest, 32, 40, [3, 5])
    worker.start_load(DeepThinkConnectorMetadata(loads=[load]),
                      SimpleNamespace(no_compile_layers={}))
    worker.shutdown()
    assert worker.take_failed_block_ids() == set()
    assert seen == [((8, 2, 64), "meta", "meta", 8)] * len(resident.keys)
    assert all(k.device.type == "cpu" for k in (*resident.keys, *resident.values))


# ------------------------------------------------------------------ item 9

@pytest.fixture(scope="module")
def huge(units):
    """An adapter whose keys overflow float16 (fine in float32)."""
    path = units.root / "huge"
    adapter = noisy_adapter(units.model, units.tokenizer, path, 24, seed=2)
    adapter.keys[0].mul_(1e6)
    adapter.save_pretrained(path)
    return path


def test_item9_an_adapter_overflowing_fp16_is_a_load_error(huge):
    """A ValueError once crashed worker init; the worker reads adapters in the background
    now, and a read that fails fails its requests only."""
    import concurrent.futures

    from vllm_deepthink.plugin.connector.resident import AdapterLoadError, ResidentAdapters
    from vllm_deepthink.plugin.connector.scheduler import (AdapterLoad,
                                                           DeepThinkConnectorMetadata)
    from vllm_deepthink.plugin.connector.worker import WorkerSide

    with pytest.raises(AdapterLoadError, match="overflow"):
        ResidentAdapters(torch.float16, 1, 0).load("huge", str(huge))
    digest = ResidentAdapters(torch.float32, 1, 0).load("huge", str(huge)).digest
    worker = WorkerSide.__new__(WorkerSide)
    worker._start(ResidentAdapters(torch.float16, 1, 0), 32)
    load = AdapterLoad("r", "huge", str(huge), digest, 0, 24, [4], is_async=True)
    worker.start_load(DeepThinkConnectorMetadata(loads=[load]), None)
    concurrent.futures.wait(list(worker._reads.values()), timeout=30)
    worker.start_load(DeepThinkConnectorMetadata(), None)
    assert worker.take_finished_recving(set()) == {"r"}
    assert worker.take_failed_block_ids() == {4}
    worker.shutdown()


def test_item9_the_frontend_reports_an_adapter_overflowing_the_engine_dtype(units, huge):
    registry = adapter_registry.AdapterRegistry(units.model_dir, dtype=torch.float16)
    with pytest.raises(AdapterFormatError, match="overflow torch.float16"):
        registry.register("huge", huge)
    registry.register_at_start({"huge": str(huge), "a1": str(units.a1)})
    assert registry.names() == ["a1"] and "overflow" in registry.failed()["huge"]
    with pytest.raises(request_checks.AdapterRequestError, match="failed to load at engine start"):
        registry.get("huge")
    adapter_registry.AdapterRegistry(units.model_dir, dtype=torch.float32).register("huge", huge)


@pytest.mark.parametrize("field,what", [
    ("pipeline_parallel_size", "pipeline parallel"),
    ("decode_context_parallel_size", "decode context parallel"),
    ("prefill_context_parallel_size", "prefill context parallel")])
def test_item9_unsupported_parallelism_is_refused_at_start(units, field, what, monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_deepthink.plugin.connector.connector import DeepThinkConnector
    from vllm_deepthink.plugin.serving import flags

    monkeypatch.delenv(flags.RUNTIME_UPDATING_ENV, raising=False)
    with pytest.raises(ValueError, match=f"does not support {what}"):
        vllm_deepthink.engine_args(adapters={"a1": units.a1}, **{field: 2})
    args = flags.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--deepthink-adapter", f"a1={units.a1}"])
    with pytest.raises(ValueError, match=f"does not support {what}"):
        flags.apply_adapter_args(EngineArgs(model=str(units.model_dir), **{field: 2}), args)
    # However the engine was configured, the connector refuses it at engine start.
    config = SimpleNamespace(
        kv_transfer_config=vllm_deepthink.engine_args()["kv_transfer_config"],
        parallel_config=SimpleNamespace(**{field: 2}),
        cache_config=SimpleNamespace(block_size=32))
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(ValueError, match=f"does not support {what}"):
            DeepThinkConnector(config, role, None)


def test_item9_registry_is_built_at_startup_off_the_event_loop(served, monkeypatch):
    """vLLM awaits OpenAIServingModels.init_static_loras in init_app_state, before the
    server accepts requests: the registry is built there, in a worker thread (today:
    by the first request, on the event loop)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    threads = []
    vllm_registry_for = adapter_registry.registry_for

    def recording(vllm_config):
        threads.append(threading.current_thread())
        return vllm_registry_for(vllm_config)

    monkeypatch.setattr(serving_models, "registry_for", recording)
    monkeypatch.setattr(adapter_registry, "_registries", {})
    models = SimpleNamespace(static_lora_modules=None,
                             engine_client=SimpleNamespace(vllm_config=served.vllm_config))
    asyncio.run(OpenAIServingModels.init_static_loras(models))
    assert threads and threads[0] is not threading.main_thread()
    registries = adapter_registry._registries
    assert registries and next(iter(registries.values())).names() == ["a1"]


def test_item9_a_start_adapter_that_fails_stops_the_server(served, huge, monkeypatch):
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    registry = adapter_registry.AdapterRegistry(served.model_config.model, dtype=torch.float16)
    registry.register_at_start({"huge": str(huge)})
    monkeypatch.setattr(serving_models, "registry_for", lambda vllm_config: registry)
    models = SimpleNamespace(static_lora_modules=None,
                             engine_client=SimpleNamespace(vllm_config=served.vllm_config))
    with pytest.raises(ValueError, match="huge: .*overflow"):
        asyncio.run(OpenAIServingModels.init_static_loras(models))


def test_plain_server_comparison_ignores_only_where_a_stream_splits():
    """test_security_plain compares streams after merging their chunks: vLLM coalesces
    the tokens a slow reader has not taken yet, so the split varies with load; the text,
    token ids, finish reason and a trailing error must still match."""
    from tests.helpers.http_probe import Probe, normalized

    def stream(*chunks, error=None) -> Probe:
        events = [{"id": "cmpl-0123456789abcdef", "object": "text_completion",
                   "choices": [{"index": 0, "text": text, "token_ids": ids,
                                "finish_reason": finish}]} for text, ids, finish in chunks]
        events += [{"error": error}] if error else []
        raw = "\n\n".join(f"data: {e}" for e in events) + "\n\ndata: [DONE]"
        return Probe(200, None, raw, events)

    three = stream(("a", [1], None), ("b", [2], None), ("c", [3], "length"))
    two = stream(("a", [1], None), ("bc", [2, 3], "length"))
    assert normalized(three) == normalized(two)
    assert normalized(three) != normalized(stream(("a", [1], None), ("bd", [2, 4], "length")))
    assert normalized(three) != normalized(stream(("abc", [1, 2, 3], "stop")))
    assert normalized(three) != normalized(
        stream(("a", [1], None), ("bc", [2, 3], "length"), error={"code": 500}))
