"""The vLLM internals vllm-deepthink relies on, checked without an engine.

Each check names the vLLM file and what we rely on; when a vLLM release changes
one, the failing test says where to look. Also unit tests of the patched
behaviour (query-only outputs, local-hit cap) on hand-made objects.
"""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402
from vllm.v1.engine.output_processor import OutputProcessor, RequestState  # noqa: E402
from vllm.v1.outputs import LogprobsTensors  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from vllm_deepthink import plugin  # noqa: E402
from vllm_deepthink.plugin import patches, protocol  # noqa: E402
from vllm_deepthink.plugin.patches import engine as engine_patches  # noqa: E402
from vllm_deepthink.plugin.patches import openai_server as server_patches  # noqa: E402
from vllm_deepthink.plugin.request_state import (  # noqa: E402
    QueryOnlyLogprobsProcessor,
    QueryOnlyRequestState,
)
from vllm_deepthink.plugin.connector.connector import DeepThinkConnector  # noqa: E402


ENGINE_SPECS = engine_patches.patch_specs()


def squashed_source(obj) -> str:
    return re.sub(r"\s+", "", inspect.getsource(obj))


def assert_source_has(obj, snippet: str, why: str) -> None:
    assert re.sub(r"\s+", "", snippet) in squashed_source(obj), (
        f"{obj.__module__}.{obj.__qualname__} no longer contains `{snippet}`; "
        f"vllm-deepthink relies on it: {why}")


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()


@pytest.mark.parametrize("spec", ENGINE_SPECS, ids=lambda s: f"{s.owner.__name__}.{s.attribute}")
def test_patched_callables_keep_their_signature(spec):
    vllm_callable = patches.original(spec.owner, spec.attribute)
    found = tuple(inspect.signature(vllm_callable).parameters)
    if spec.parameters[0] != "self":  # classmethod: the raw function takes cls
        found = found[1:]
    assert found == spec.parameters, (
        f"{spec.vllm_file}: {spec.owner.__name__}.{spec.attribute} now takes {found}, "
        f"the patch in plugin/patches/engine.py was written for {spec.parameters}")


def test_register_is_reentrant_and_patches_once():
    before = {s.attribute: s.owner.__dict__[s.attribute] for s in ENGINE_SPECS}
    plugin.register()
    plugin.register()
    for spec in ENGINE_SPECS:
        assert spec.owner.__dict__[spec.attribute] is before[spec.attribute]
        original = patches.original(spec.owner, spec.attribute)
        assert not hasattr(original, "__deepthink_original__"), "patched twice"
    assert protocol.CONNECTOR_NAME in KVConnectorFactory._registry


def test_version_check():
    plugin.check_vllm_version("0.32.0")
    plugin.check_vllm_version("0.32.3+cpu")
    with pytest.raises(RuntimeError, match="supports vllm>=0.32,<0.33, found vllm 0.33.0"):
        plugin.check_vllm_version("0.33.0")
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS"):
        plugin.check_vllm_version("0.31.9")


def test_register_on_an_untested_vllm_logs_and_stays_inert(monkeypatch, caplog):
    """Issue 32 item 7: register() runs in every vLLM process of the environment (plain
    servers included); on an untested vLLM it must not raise (before: RuntimeError)."""
    applied = []
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    monkeypatch.setattr(patches, "apply_all", lambda: applied.append("patches"))
    monkeypatch.setattr(KVConnectorFactory, "register_connector",
                        lambda *args: applied.append("connector"))
    monkeypatch.delitem(KVConnectorFactory._registry, protocol.CONNECTOR_NAME)
    with caplog.at_level("ERROR", logger="vllm_deepthink.plugin"):
        plugin.register()
    assert applied == []
    assert protocol.CONNECTOR_NAME not in KVConnectorFactory._registry
    assert any("inactive" in r.message and "found vllm 0.33.0" in r.message
               and r.levelname == "ERROR" for r in caplog.records), caplog.text


def test_connector_implements_every_abstract_method():
    assert not DeepThinkConnector.__abstractmethods__
    signature = inspect.signature(KVConnectorBase_V1.__init__)
    assert tuple(signature.parameters) == ("self", "vllm_config", "role", "kv_cache_config")


def test_scheduler_contract():
    # vllm/v1/core/sched/scheduler.py
    assert_source_has(Scheduler.schedule,
                      "self.connector.get_num_new_matched_tokens(request, block_aligned_local)",
                      "the connector is offered the block-aligned local hit")
    assert_source_has(Scheduler.schedule,
                      "if request.skip_reading_prefix_cache: ext_tokens, load_kv_async = 0, False",
                      "adapter requests must not skip reading the prefix cache")
    assert_source_has(Scheduler.schedule,
                      "self.connector.update_state_after_alloc(request, "
                      "self.kv_cache_manager.get_blocks(request_id), num_external_computed_tokens,)",
                      "update_state_after_alloc receives all of the request's blocks")
    # vllm/v1/request.py
    assert_source_has(Request.__init__,
                      'self.kv_transfer_params = sampling_params.extra_args.get("kv_transfer_params")',
                      "kv_transfer_params travel in SamplingParams.extra_args")


def test_block_failures_fail_the_request():
    # vllm/v1/core/sched/scheduler.py: failed blocks of a sync load fail the request
    # under kv_load_failure_policy="fail" (the default engine_args sets).
    assert_source_has(Scheduler._handle_invalid_blocks,
                      "should_fail = not self.recompute_kv_load_failures",
                      "failed adapter loads must fail the request")


def test_prompt_logprob_rows_cover_the_whole_prompt():
    # vllm/v1/worker/gpu_model_runner.py: one row per prompt token but the first,
    # rows of computed positions only are filled (start_idx = num_computed_tokens).
    source = GPUModelRunner._get_prompt_logprobs_dict
    assert_source_has(source, "LogprobsTensors.empty_cpu(num_prompt_tokens - 1,",
                      "QueryOnlyLogprobsProcessor drops the first L rows")
    assert_source_has(source, "start_idx = request.num_computed_tokens",
                      "rows of loaded positions are not computed")
    # vllm/v1/worker/gpu/sample/prompt_logprob.py (V2 runner, default with Triton):
    # rows of computed positions only, concatenated once at the end of prefill.
    from vllm.v1.worker.gpu.sample.prompt_logprob import PromptLogprobsWorker

    assert_source_has(PromptLogprobsWorker.compute_prompt_logprobs,
                      "logprobs = LogprobsTensors.cat(prompt_logprobs_list)",
                      "QueryOnlyLogprobsProcessor keeps the last q - 1 rows of one delivery")
    assert LogprobsTensors._fields[:3] == ("logprob_token_ids", "logprobs",
                                           "selected_token_ranks")


def test_output_processor_contract():
    # vllm/v1/engine/output_processor.py
    assert_source_has(OutputProcessor.process_outputs,
                      "req_state.num_cached_tokens = (engine_core_output.prefill_stats.num_cached_tokens)",
                      "QueryOnlyRequestState subtracts L when this is assigned")
    assert_source_has(RequestState.__init__, "self.num_cached_tokens = 0", "")
    # vllm/v1/engine/logprobs.py
    assert tuple(inspect.signature(LogprobsProcessor._update_prompt_logprobs).parameters) == (
        "self", "prompt_logprobs_tensors")
    assert_source_has(LogprobsProcessor.update_from_output,
                      "self._update_prompt_logprobs(output.new_prompt_logprobs_tensors)", "")


def test_kv_cache_manager_contract():
    # vllm/v1/core/kv_cache_manager.py
    assert tuple(inspect.signature(KVCacheManager.truncate_computed_blocks).parameters) == (
        "self", "blocks", "num_computed_tokens")


def test_local_prefix_cache_hit_contract():
    # vllm/v1/core/sched/scheduler.py: patch_local_prefix_cache_hit caps the 4-tuple
    # the scheduler takes the local hit from, before it asks the connector.
    vllm_hit = patches.original(Scheduler, "_get_local_prefix_cache_hit")
    assert_source_has(vllm_hit, "self.kv_cache_manager.get_computed_blocks(request)",
                      "the local hit comes from the KV cache manager")
    assert_source_has(vllm_hit, "return blocks, num_local, shared_prefix_boundary, False",
                      "the patch unpacks (blocks, num_computed, boundary, diverged)")
    assert_source_has(vllm_hit, "connector.supports_divergent_local_hybrid_hits",
                      "our connector takes the get_computed_blocks path")
    assert DeepThinkConnector.supports_divergent_local_hybrid_hits.fget(None) is False
    assert_source_has(Scheduler.schedule, "= self._get_local_prefix_cache_hit(request)",
                      "every waiting request's local hit passes through the patch")
    assert_source_has(Scheduler.__init__, "self.block_size = block_size",
                      "the cap rounds to the scheduler's block size")


def test_mm_embedding_inputs_contract():
    # vllm/config/vllm.py: every KV consumer gets embedding inputs, and the rule reads
    # kv_transfer_config, which patch_mm_embedding_inputs hides for our connector.
    from vllm.config import VllmConfig

    vllm_resolve = patches.original(VllmConfig, "_resolve_mm_embedding_inputs")
    assert_source_has(vllm_resolve, "kv_config = self.kv_transfer_config", "")
    assert_source_has(vllm_resolve, "(kv_config is not None and kv_config.is_kv_consumer)",
                      "a consumer may omit embedding tensors")
    assert_source_has(vllm_resolve, "mm_config.enable_mm_embeds = True",
                      "a consumer accepts embedding inputs")
    assert_source_has(VllmConfig.__post_init__, "self._resolve_mm_embedding_inputs()",
                      "resolved while the config is built")


def test_client_errors_contract():
    # vllm/v1/engine/async_llm.py: a VLLMClientError from process_inputs reaches the
    # server as is; anything else becomes EngineGenerateError (500, empty message).
    from vllm.entrypoints.serve import create_error_response
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_deepthink.plugin import request_checks, rewrite
    from vllm_deepthink.plugin import registry as adapter_registry

    assert_source_has(AsyncLLM.generate, "except (VLLMClientError, GracefulHTTPError) as e:",
                      "AdapterRequestError is raised as a VLLMClientError")
    # vllm/entrypoints/serve/exception_handling/error_response.py: status and message.
    for exc, status in ((request_checks.AdapterRequestError("bad", param="prompt"), 400),
                        (request_checks.UnknownAdapterError("nosuch"), 404)):
        error = engine_patches.client_error(exc)
        assert isinstance(error, request_checks.AdapterRequestError)
        info = create_error_response(error).error
        assert info.code == status and info.message.startswith(str(exc)), info


def test_static_lora_init_contract():
    # vllm/entrypoints/launchers/api_server/app_state.py: awaited while the server
    # starts, before it serves (patch_serving_models_init builds the registry there).
    from vllm.entrypoints.launchers.api_server import app_state

    assert_source_has(app_state.init_app_state,
                      "await state.openai_serving_models.init_static_loras()",
                      "the adapter registry is built at start-up")


def test_beam_search_contract():
    # vllm/entrypoints/generate/beam_search/utils.py: each step re-submits the rendered
    # prompt's text with the grown ids (rewrite.query_token_ids strips BOS by prefix).
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchSequence

    assert_source_has(BeamSearchSequence.get_prompt,
                      "return tokens_input(self.tokens, prompt=prompt_text, "
                      "cache_salt=cache_salt,)", "the text travels with the grown ids")


def test_reserved_fields_are_checked_before_streaming():
    # The OpenAI endpoints with client extra_args / kv_transfer_params / cache_salt call
    # _check_model before they render the request (patch_serving_check_model refuses
    # the plugin's reserved fields there, with a 400 status even for streams).
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    for method in (OpenAIServingResponses._create_responses, ServingTokens.serve_tokens):
        assert_source_has(method, "await self._check_model(request)", "")


def test_cpu_core_reservation_ignores_our_connector(monkeypatch):
    # vllm/utils/ompmultiprocessing.py: the extra reservation for any KV connector.
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    vllm_init = patches.original(OMPProcessManager, "__init__")
    assert_source_has(vllm_init, "if config.kv_transfer_config: "
                                 "self.reserve_cpu_num += self.local_world_size",
                      "patch_cpu_core_reservation undoes exactly this reservation")
    if not current_platform.is_cpu():
        pytest.skip("OMPProcessManager only acts on the CPU platform")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    parallel = SimpleNamespace(local_world_size=1, data_parallel_rank_local=0,
                               _api_process_count=1)

    def reserved(connector):
        kv = None if connector is None else SimpleNamespace(kv_connector=connector)
        config = SimpleNamespace(parallel_config=parallel, kv_transfer_config=kv)
        return OMPProcessManager(config).reserve_cpu_num

    assert reserved(protocol.CONNECTOR_NAME) == reserved(None)
    assert reserved("NixlConnector") == reserved(None) + 1
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    assert reserved(protocol.CONNECTOR_NAME) == 0


@pytest.mark.parametrize("module,cls", [
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl"),
    ("vllm.v1.attention.backends.flashinfer", "FlashInferImpl"),
])
def test_backends_write_kv_through_do_kv_cache_update(module, cls):
    import importlib

    try:
        impl = getattr(importlib.import_module(module), cls)
    except ImportError as exc:  # a backend whose kernels are not built on this machine
        pytest.skip(f"{module}: {exc}")
    params = tuple(inspect.signature(impl.do_kv_cache_update).parameters)
    assert params == ("self", "layer", "key", "value", "kv_cache", "slot_mapping")


def test_attention_layer_attributes():
    from vllm.model_executor.layers.attention.attention import Attention

    for attribute in ("self.num_kv_heads = num_kv_heads", "self.head_size = head_size",
                      "self.attn_type = attn_type", "self.kv_cache = torch.tensor([])",
                      "self.kv_sharing_target_layer_name = kv_sharing_target_layer_name",
                      "self.impl = impl_cls("):
        assert_source_has(Attention.__init__, attribute, "the connector writes through the layer")


# ---------------------------------------------------------------- patched behaviour

def adapter_params(prefix_len, prompt_logprobs=None):
    """SamplingParams as the frontend rewrite leaves them for an adapter of L=prefix_len."""
    from vllm import SamplingParams

    from vllm_deepthink.plugin import request_checks, rewrite
    from vllm_deepthink.plugin import registry as adapter_registry

    params = SamplingParams(prompt_logprobs=prompt_logprobs)
    params.extra_args = {"kv_transfer_params": {protocol.PARAMS_KEY: {
        "name": "a", "path": "/x", "digest": "0" * 64, "prefix_len": prefix_len,
        "frontend": adapter_registry.FRONTEND_TOKEN}}}
    return params


@pytest.mark.parametrize("runner_rows", ["v1: every prompt position", "v2: computed positions"])
def test_query_only_logprobs_keep_the_query_rows(runner_rows):
    prefix_len, query_len = 5, 4
    processor = QueryOnlyLogprobsProcessor.wrap(
        LogprobsProcessor.from_new_request(None, SimpleNamespace(
            sampling_params=adapter_params(prefix_len, prompt_logprobs=0))), query_len)
    leading = prefix_len if runner_rows.startswith("v1") else 0
    rows = leading + query_len - 1
    token_ids = torch.full((rows, 1), 2**40, dtype=torch.int64)   # garbage ids ...
    token_ids[leading:, 0] = torch.tensor([11, 12, 13])            # ... but the query's
    logprobs = torch.arange(rows, dtype=torch.float32).unsqueeze(1).neg()
    ranks = torch.ones(rows, dtype=torch.int64)
    processor._update_prompt_logprobs(LogprobsTensors(token_ids, logprobs, ranks))
    result = processor.prompt_logprobs
    assert result[0] is None and len(result) == query_len
    assert [next(iter(r)) for r in result[1:]] == [11, 12, 13]
    assert [r[i].logprob for r, i in zip(result[1:], [11, 12, 13])] == [
        -float(leading), -float(leading + 1), -float(leading + 2)]


def test_query_only_request_state_counts_query_cache_hits():
    state = QueryOnlyRequestState.__new__(QueryOnlyRequestState)
    state.prefix_len = 48
    state.num_cached_tokens = 48
    assert state.num_cached_tokens == 0
    state.num_cached_tokens = 64
    assert state.num_cached_tokens == 16


def test_local_hit_cap():
    def request(params):
        return SimpleNamespace(sampling_params=params,
                               kv_transfer_params=params.extra_args.get("kv_transfer_params"))

    assert engine_patches.local_hit_cap(request(adapter_params(45, prompt_logprobs=0)), 32) == 32
    assert engine_patches.local_hit_cap(request(adapter_params(64, prompt_logprobs=1)), 32) == 64
    assert engine_patches.local_hit_cap(request(adapter_params(45)), 32) is None
    plain = SimpleNamespace(sampling_params=None, kv_transfer_params=None)
    assert engine_patches.local_hit_cap(plain, 32) is None

    def scoring(scored_from, **kwargs):
        params = vllm.SamplingParams(extra_args={protocol.SCORED_FROM_ARG: scored_from},
                                     skip_reading_prefix_cache=False, **kwargs)
        return SimpleNamespace(sampling_params=params, kv_transfer_params=None)

    # Row s - 1 scores token s: the hit must leave position s - 1 to be computed.
    assert engine_patches.local_hit_cap(scoring(65, prompt_logprobs=0), 32) == 64
    assert engine_patches.local_hit_cap(scoring(64, prompt_logprobs=0), 32) == 32
    assert engine_patches.local_hit_cap(scoring(1, prompt_logprobs=0), 32) == 0
    assert engine_patches.local_hit_cap(scoring(64), 32) is None  # no prompt logprobs: no cap


# =================================================================== serving patches
# `vllm serve --deepthink-adapter` (patches/openai_server.py, serving/). Checked
# without a server; tests/test_server*.py run the real one.

SERVING_SPECS = server_patches.patch_specs()


def _raw_parameters(spec) -> tuple[str, ...]:
    found = tuple(inspect.signature(patches.original(spec.owner, spec.attribute)).parameters)
    if isinstance(spec.owner.__dict__[spec.attribute], classmethod):
        found = found[1:]  # cls
    return found


@pytest.mark.parametrize("spec", SERVING_SPECS, ids=lambda s: f"{s.owner.__name__}.{s.attribute}")
def test_serving_patches_keep_their_signature(spec):
    found = _raw_parameters(spec)
    assert found == spec.parameters, (
        f"{spec.vllm_file}: {spec.owner.__name__}.{spec.attribute} now takes {found}, "
        f"the patch in plugin/patches/openai_server.py was written for {spec.parameters}")


def test_serving_patches_apply_once():
    before = {(s.owner, s.attribute): s.owner.__dict__[s.attribute] for s in SERVING_SPECS}
    plugin.register()
    server_patches.apply()
    for spec in SERVING_SPECS:
        assert spec.owner.__dict__[spec.attribute] is before[(spec.owner, spec.attribute)]
        assert patches.is_patched(spec.owner, spec.attribute)
        assert not hasattr(patches.original(spec.owner, spec.attribute), "__deepthink_original__")


def test_serve_cli_contract():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers import app
    from vllm.entrypoints.launchers.api_server import entry

    # vllm/engine/arg_utils.py: plugins load before the engine flags are added.
    source = squashed_source(AsyncEngineArgs.add_cli_args)
    assert source.index("load_general_plugins()") < source.index(
        "EngineArgs.add_cli_args(parser)"), (
        "AsyncEngineArgs.add_cli_args must load the general plugins before "
        "EngineArgs.add_cli_args, or --deepthink-adapter is never added")
    # vllm/entrypoints/launchers/api_server/entry.py: the API server's engine args.
    assert_source_has(entry.build_async_engine_client,
                      "engine_args = AsyncEngineArgs.from_cli_args(args)",
                      "the adapter flags become kv_transfer_config in from_cli_args")
    # vllm/entrypoints/launchers/app.py: routes are added through the module global.
    assert_source_has(app.build_app,
                      "register_api_routers(args, app, supported_tasks, model_config)",
                      "patch_api_routers wraps the name build_app calls")


def test_openai_serving_contract():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.engine.async_llm import AsyncLLM

    why = "an adapter name must pass _check_model and resolve in _maybe_get_adapters"
    assert_source_has(OpenAIServingCompletion.render_completion_request,
                      "await self._check_model(request)", why)
    assert_source_has(OpenAIServingChat.render_chat_request,
                      "await self._check_model(request)", why)
    for method in (OpenAIServingCompletion._create_completion,
                   OpenAIServingChat._create_chat_completion):
        assert_source_has(method, "lora_request = self._maybe_get_adapters(request", why)
        assert_source_has(method, "model_name = self.models.model_name(lora_request)",
                          "the response's model is the stand-in's name")
        assert_source_has(method, "lora_request=lora_request,",
                          "the stand-in reaches AsyncLLM.generate as lora_request")
    assert_source_has(OpenAIServingModels.model_name, "return lora_request.lora_name",
                      "the response's model is the stand-in's name")
    assert_source_has(AsyncLLM.generate, "await self.add_request(",
                      "patch_async_llm_add_request sees every generate call")
    assert_source_has(OpenAIServingModels.load_lora_adapter,
                      "await self._check_load_lora_adapter_request(request)",
                      "a LoRA named like a Deep-Thinking adapter is refused in that check")


def test_engine_flags_reach_vllm_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["m", "--deepthink-adapter", "a=/x", "c=/z", "--deepthink-adapter",
                              '{"name": "b", "path": "/y", "base_model_name": "m"}',
                              "--deepthink-adapter-dir", "/store",
                              "--deepthink-resident-gib", "0.5", "--deepthink-pin", "a"])
    assert [(s.name, s.path, s.base_model_name) for s in args.deepthink_adapter] == [
        ("a", "/x", None), ("c", "/z", None), ("b", "/y", "m")]
    assert args.deepthink_adapter_dir == ["/store"]
    assert args.deepthink_resident_gib == 0.5
    assert args.deepthink_pin == ["a"]
    help_text = parser.format_help()
    for flag in ("--deepthink-adapter", "--deepthink-adapter-dir", "--deepthink-resident-gib",
                 "--deepthink-pin"):
        assert flag in help_text


def test_adapter_stand_in_becomes_extra_args():
    from vllm import SamplingParams

    from vllm_deepthink.plugin.serving import models as serving

    params = SamplingParams(max_tokens=3, extra_args={"other": 1})
    stand_in = serving.AdapterModelRequest(lora_name="sst2", lora_int_id=1, lora_path="/a")
    params, lora_request = serving.to_engine_request(params, stand_in)
    assert lora_request is None
    assert params.extra_args == {"other": 1, protocol.ADAPTER_ARG: "sst2"}
    # A real LoRA request (and none) pass untouched.
    from vllm.lora.request import LoRARequest

    lora = LoRARequest(lora_name="l", lora_int_id=2, lora_path="/l")
    plain = SamplingParams(max_tokens=3)
    assert serving.to_engine_request(plain, lora) == (plain, lora)
    assert plain.extra_args is None


def test_tensor_parallel_kv_head_sharding():
    # vllm/model_executor/layers/linear.py: kv_layout.kv_head_range mirrors it.
    from vllm.model_executor.layers.linear import QKVParallelLinear

    assert_source_has(QKVParallelLinear.__init__,
                      "self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads)",
                      "heads replicate when tp > kv heads")
    assert_source_has(QKVParallelLinear.weight_loader,
                      "shard_rank = self.tp_rank // self.num_kv_head_replicas",
                      "rank r holds KV head r // replicas")
