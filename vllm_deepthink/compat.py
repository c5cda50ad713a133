"""Every monkeypatch of vLLM internals, one function per patch.

Each patch names the vLLM file it targets and records the signature it was
written against in PATCHES; tests/test_compat.py fails loudly when a vLLM
release changes one of them. Tested range: vllm >= 0.32, < 0.33.

All patches act only on adapter requests (those carrying our kv_transfer_params
entry or selecting an adapter); every other request takes vLLM's own path.
`apply_all()` is idempotent: plugins load in every vLLM process, sometimes twice.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.logprobs import LogprobsProcessor
from vllm.v1.engine.output_processor import RequestState
from vllm.utils.ompmultiprocessing import OMPProcessManager
from vllm.v1.outputs import LogprobsTensors

from vllm_deepthink import frontend

logger = init_logger(__name__)

_ORIGINAL = "__deepthink_original__"


@dataclass(frozen=True)
class PatchSpec:
    """One patched vLLM callable and the parameters it had when we wrote the patch."""

    owner: type
    attribute: str
    vllm_file: str
    parameters: tuple[str, ...]


PATCHES = (
    PatchSpec(InputProcessor, "process_inputs", "vllm/v1/engine/input_processor.py",
              ("self", "request_id", "prompt", "params", "supported_tasks", "arrival_time",
               "lora_request", "tokenization_kwargs", "trace_headers", "priority",
               "data_parallel_rank", "resumable", "session_id", "kv_hints")),
    PatchSpec(RequestState, "from_new_request", "vllm/v1/engine/output_processor.py",
              ("tokenizer", "request", "prompt", "parent_req", "request_index", "queue",
               "log_stats", "stream_interval")),
    PatchSpec(KVCacheManager, "get_computed_blocks", "vllm/v1/core/kv_cache_manager.py",
              ("self", "request")),
    PatchSpec(OMPProcessManager, "__init__", "vllm/utils/ompmultiprocessing.py",
              ("self", "config")),
)


def original(owner: type, attribute: str) -> Callable:
    """vLLM's own implementation of a (possibly patched) callable."""
    current = owner.__dict__[attribute]
    func = current.__func__ if isinstance(current, (classmethod, staticmethod)) else current
    return getattr(func, _ORIGINAL, func)


def _is_patched(owner: type, attribute: str) -> bool:
    current = owner.__dict__[attribute]
    func = current.__func__ if isinstance(current, (classmethod, staticmethod)) else current
    return hasattr(func, _ORIGINAL)


def patch_input_processor() -> None:
    """vllm/v1/engine/input_processor.py: InputProcessor.process_inputs.

    The one frontend entry both `LLM` and `AsyncLLM` pass through (AsyncLLM's
    process_inputs_async wraps the bound method at construction, after plugins
    load). Rewrites an adapter request into placeholder + query token ids, the
    adapter's cache salt and kv_transfer_params (frontend.rewrite_request), then
    lets vLLM validate and build the EngineCoreRequest as usual.
    """
    if _is_patched(InputProcessor, "process_inputs"):
        return
    vllm_process_inputs = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if not isinstance(params, SamplingParams):
            return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        name = frontend.adapter_name(params)
        if name is None:
            frontend.reject_forged_params(params)
            return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        if kwargs.get("resumable"):
            raise frontend.AdapterRequestError(
                "streaming-input (resumable) requests cannot use a Deep-Thinking adapter")
        info = frontend.registry_for(self.vllm_config).get(name)
        prompt, params = frontend.rewrite_request(
            info, prompt, params, self.tokenizer, self.model_config.max_model_len)
        return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)

    setattr(process_inputs, _ORIGINAL, vllm_process_inputs)
    process_inputs.__doc__ = vllm_process_inputs.__doc__
    InputProcessor.process_inputs = process_inputs


class QueryOnlyRequestState(RequestState):
    """RequestState of an adapter request: the prompt is the query alone.

    num_cached_tokens counts query positions only (the engine reports the
    adapter's L positions as cached, since they are loaded, never computed).
    """

    prefix_len = 0

    @property
    def num_cached_tokens(self) -> int:
        return self._query_cached_tokens

    @num_cached_tokens.setter
    def num_cached_tokens(self, value: int) -> None:
        self._query_cached_tokens = max(0, value - self.prefix_len)


@dataclass
class QueryOnlyLogprobsProcessor(LogprobsProcessor):
    """Keeps only the prompt-logprob rows that score query tokens.

    Row i of the engine's prompt logprobs scores prompt token i + 1. The V1
    model runner (vllm/v1/worker/gpu_model_runner.py, used on CPU) returns a row
    for every prompt position but the last, L + q - 1 rows, and the rows of the
    L loaded positions hold uninitialised memory (garbage token ids crash
    detokenisation); the V2 runner (vllm/v1/worker/gpu/sample/prompt_logprob.py)
    returns rows of computed positions only, q - 1 rows. Both deliver them in one
    tensor at the end of prefill, so the query's rows are its last q - 1. The
    first query token, scored from the last placeholder position which has no
    hidden state, gets None like any first prompt token.
    """

    query_rows: int = 0

    @classmethod
    def wrap(cls, processor: LogprobsProcessor, query_len: int) -> QueryOnlyLogprobsProcessor:
        values = {f.name: getattr(processor, f.name) for f in dataclasses.fields(processor)}
        return cls(**values, query_rows=max(0, query_len - 1))

    def _update_prompt_logprobs(self, prompt_logprobs_tensors: LogprobsTensors) -> None:
        rows = prompt_logprobs_tensors.logprobs.shape[0]
        skip = max(0, rows - self.query_rows)
        self.query_rows -= rows - skip
        if skip == rows:
            return
        token_ids, logprobs, ranks = prompt_logprobs_tensors[:3]
        super()._update_prompt_logprobs(
            LogprobsTensors(token_ids[skip:], logprobs[skip:], ranks[skip:]))


def patch_request_state() -> None:
    """vllm/v1/engine/output_processor.py: RequestState.from_new_request.

    Outputs never show the placeholders: for an adapter request the state is
    built from the query ids alone (prompt_token_ids, detokenizer context,
    prompt_len), prompt logprobs drop the placeholder rows and num_cached_tokens
    counts the query only. The request sent to the engine core is not touched.
    """
    if _is_patched(RequestState, "from_new_request"):
        return
    vllm_from_new_request = original(RequestState, "from_new_request")

    def from_new_request(cls, tokenizer, request, prompt, parent_req, request_index,
                         queue, log_stats, stream_interval):
        entry = (frontend.adapter_transfer_params(request.sampling_params)
                 if request.sampling_params is not None else None)
        if entry is None:
            return vllm_from_new_request(
                cls, tokenizer=tokenizer, request=request, prompt=prompt,
                parent_req=parent_req, request_index=request_index, queue=queue,
                log_stats=log_stats, stream_interval=stream_interval)
        prefix_len = int(entry["prefix_len"])
        query_request = copy.copy(request)
        query_request.prompt_token_ids = list(request.prompt_token_ids[prefix_len:])
        state = vllm_from_new_request(
            QueryOnlyRequestState, tokenizer=tokenizer, request=query_request,
            prompt=prompt, parent_req=parent_req, request_index=request_index,
            queue=queue, log_stats=log_stats, stream_interval=stream_interval)
        state.prefix_len = prefix_len
        processor = state.logprobs_processor
        if processor is not None and processor.prompt_logprobs is not None:
            state.logprobs_processor = QueryOnlyLogprobsProcessor.wrap(
                processor, len(query_request.prompt_token_ids))
        return state

    setattr(from_new_request, _ORIGINAL, vllm_from_new_request)
    RequestState.from_new_request = classmethod(from_new_request)


def local_hit_cap(request: Any, block_size: int) -> int | None:
    """The longest local prefix-cache hit a prompt-logprob request may take, or None.

    The runner has no logprobs for cached positions, so a prompt-logprob request
    must compute every position it scores. An adapter request's local hit stops at
    the adapter's last full block (the connector loads the rest of the prefix). A
    plain request with extra_args[SCORED_FROM_ARG] = s (it reads the prefix cache,
    skip_reading_prefix_cache=False) stops at the last full block before s - 1,
    whose hidden state scores token s. Other requests: no cap.
    """
    params = request.sampling_params
    if params is None or params.prompt_logprobs is None:
        return None
    kv_params = getattr(request, "kv_transfer_params", None)
    entry = kv_params.get(frontend.PARAMS_KEY) if isinstance(kv_params, dict) else None
    if isinstance(entry, dict):
        return int(entry["prefix_len"]) // block_size * block_size
    scored_from = (params.extra_args or {}).get(frontend.SCORED_FROM_ARG)
    if scored_from is None:
        return None
    return max(0, int(scored_from) - 1) // block_size * block_size


def patch_kv_cache_manager() -> None:
    """vllm/v1/core/kv_cache_manager.py: KVCacheManager.get_computed_blocks.

    Caps the local prefix-cache hit of prompt-logprob requests (local_hit_cap):
    adapter requests at the adapter's full blocks (without it the same query sent
    twice hits its own cached blocks past L and those query rows get no
    logprobs), scoring requests before the positions they score.
    """
    if _is_patched(KVCacheManager, "get_computed_blocks"):
        return
    vllm_get_computed_blocks = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request):
        blocks, num_computed, shared_prefix_boundary = vllm_get_computed_blocks(self, request)
        block_size = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        cap = local_hit_cap(request, block_size)
        if cap is not None and num_computed > cap:
            blocks = self.truncate_computed_blocks(blocks, cap)
            num_computed = cap
            shared_prefix_boundary = min(shared_prefix_boundary, cap)
        return blocks, num_computed, shared_prefix_boundary

    setattr(get_computed_blocks, _ORIGINAL, vllm_get_computed_blocks)
    get_computed_blocks.__doc__ = vllm_get_computed_blocks.__doc__
    KVCacheManager.get_computed_blocks = get_computed_blocks


class _ConfigWithoutKVConnector:
    """A read-only view of a VllmConfig whose kv_transfer_config is None."""

    kv_transfer_config = None

    def __init__(self, config: Any):
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def uses_deepthink_connector(config: Any) -> bool:
    kv_config = getattr(config, "kv_transfer_config", None)
    return kv_config is not None and kv_config.kv_connector == frontend.CONNECTOR_NAME


def patch_cpu_core_reservation() -> None:
    """vllm/utils/ompmultiprocessing.py: OMPProcessManager.__init__ (CPU backend only).

    With any KV connector configured, vLLM's CPU backend reserves one more core per
    worker, meant for NIXL's transfer threads in prefill/decode disaggregation. The
    DeepThink connector runs inside the forward pass on the worker's own threads, so
    that core would idle; on 2 cores the reservation exceeds the machine, vLLM then
    reserves none and the worker's OpenMP threads share a core with the scheduler
    (measured: about 3x slower than the same engine without a connector). For our
    connector the reservation is computed as without a connector;
    VLLM_CPU_NUM_OF_RESERVED_CPU still overrides it.
    """
    if _is_patched(OMPProcessManager, "__init__"):
        return
    vllm_init = OMPProcessManager.__init__

    def __init__(self, config):
        vllm_init(self, _ConfigWithoutKVConnector(config)
                  if uses_deepthink_connector(config) else config)

    setattr(__init__, _ORIGINAL, vllm_init)
    __init__.__doc__ = vllm_init.__doc__
    OMPProcessManager.__init__ = __init__


def apply_all() -> None:
    """Apply every patch (idempotent)."""
    patch_input_processor()
    patch_request_state()
    patch_kv_cache_manager()
    patch_cpu_core_reservation()
    apply_serving()


# ============================================================================ serving
# `vllm serve --deepthink-adapter` (serving.py owns the logic, these only plug it in).
# Applied in every process like the patches above; the entrypoint modules are
# imported here, inside the functions, so compat stays cheap to import. Each patch
# leaves requests for the base model and LoRA adapters on vLLM's own path.


def serving_patch_specs() -> tuple[PatchSpec, ...]:
    """PatchSpecs of the OpenAI-server patches (imports vLLM's entrypoint modules).
    Classmethod parameters omit cls, as in PATCHES; an owner may be a module."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers import app as app_module
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.v1.engine.async_llm import AsyncLLM

    return (
        PatchSpec(EngineArgs, "add_cli_args", "vllm/engine/arg_utils.py", ("parser",)),
        PatchSpec(EngineArgs, "from_cli_args", "vllm/engine/arg_utils.py", ("args",)),
        PatchSpec(BaseServing, "_check_model", "vllm/entrypoints/serve/engine/serving.py",
                  ("self", "request")),
        PatchSpec(BaseServing, "_maybe_get_adapters",
                  "vllm/entrypoints/serve/engine/serving.py",
                  ("self", "request", "supports_default_mm_loras")),
        PatchSpec(OpenAIServingModels, "show_available_models",
                  "vllm/entrypoints/openai/models/serving.py", ("self",)),
        PatchSpec(AsyncLLM, "add_request", "vllm/v1/engine/async_llm.py",
                  ("self", "request_id", "prompt", "params", "arrival_time", "lora_request",
                   "tokenization_kwargs", "trace_headers", "priority", "data_parallel_rank",
                   "session_id", "prompt_text", "reasoning_ended", "reasoning_parser_kwargs",
                   "kv_hints")),
        PatchSpec(app_module, "register_api_routers", "vllm/entrypoints/launchers/app.py",
                  ("args", "app", "supported_tasks", "model_config")),
    )


def _replace(owner: Any, attribute: str, func: Callable, wrapper: type | None = None) -> None:
    """Install func as owner.attribute, remembering vLLM's own implementation."""
    setattr(func, _ORIGINAL, original(owner, attribute))
    setattr(owner, attribute, wrapper(func) if wrapper is not None else func)


def patch_engine_args_add_cli_args() -> None:
    """vllm/engine/arg_utils.py: EngineArgs.add_cli_args.

    Adds --deepthink-adapter NAME=PATH and --deepthink-adapter-dir DIR.
    AsyncEngineArgs.add_cli_args loads the general plugins (so this patch) right
    before it calls EngineArgs.add_cli_args: `vllm serve` parses the flags and
    lists them in --help.
    """
    from vllm.engine.arg_utils import EngineArgs

    if _is_patched(EngineArgs, "add_cli_args"):
        return
    vllm_add_cli_args = original(EngineArgs, "add_cli_args")

    def add_cli_args(parser):
        from vllm_deepthink import serving

        return serving.add_cli_args(vllm_add_cli_args(parser))

    _replace(EngineArgs, "add_cli_args", add_cli_args, staticmethod)


def patch_engine_args_from_cli_args() -> None:
    """vllm/engine/arg_utils.py: EngineArgs.from_cli_args.

    Every `vllm serve` path (one API server, several, headless) builds its engine
    arguments here: the adapter flags become the connector's kv_transfer_config,
    as api.engine_args(adapters=...) does (serving.apply_adapter_args).
    """
    from vllm.engine.arg_utils import EngineArgs

    if _is_patched(EngineArgs, "from_cli_args"):
        return
    vllm_from_cli_args = original(EngineArgs, "from_cli_args")

    def from_cli_args(cls, args):
        from vllm_deepthink import serving

        return serving.apply_adapter_args(vllm_from_cli_args(cls, args), args)

    _replace(EngineArgs, "from_cli_args", from_cli_args, classmethod)


def patch_serving_check_model() -> None:
    """vllm/entrypoints/serve/engine/serving.py: BaseServing._check_model.

    A served adapter's name is a valid `model`; any other unknown name still gets
    vLLM's 404, whose message then also lists the adapters.
    """
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if _is_patched(BaseServing, "_check_model"):
        return
    vllm_check_model = BaseServing._check_model

    async def _check_model(self, request):
        from vllm_deepthink import serving

        if serving.is_adapter_model(self.models, getattr(request, "model", None)):
            if self.request_logger is not None:
                self.request_logger.log_request_body(request)
            return None
        error = await vllm_check_model(self, request)
        return serving.name_served_adapters(self.models, error) if error is not None else None

    _replace(BaseServing, "_check_model", _check_model)


def patch_serving_maybe_get_adapters() -> None:
    """vllm/entrypoints/serve/engine/serving.py: BaseServing._maybe_get_adapters.

    An adapter's name resolves to serving.AdapterModelRequest, a LoRARequest
    stand-in: the serving code reports its name as the response's `model`, and
    patch_async_llm_add_request turns it into extra_args before the engine.
    """
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if _is_patched(BaseServing, "_maybe_get_adapters"):
        return
    vllm_maybe_get_adapters = BaseServing._maybe_get_adapters

    def _maybe_get_adapters(self, request, supports_default_mm_loras=False):
        from vllm_deepthink import serving

        stand_in = serving.adapter_model_request(self.models, getattr(request, "model", None))
        if stand_in is not None:
            return stand_in
        return vllm_maybe_get_adapters(self, request, supports_default_mm_loras)

    _replace(BaseServing, "_maybe_get_adapters", _maybe_get_adapters)


def patch_async_llm_add_request() -> None:
    """vllm/v1/engine/async_llm.py: AsyncLLM.add_request.

    The funnel of every generate call of the OpenAI server (beam search included):
    an AdapterModelRequest passed as lora_request becomes
    extra_args["deepthink_adapter"] (which patch_input_processor then rewrites)
    and never reaches the engine as a LoRA.
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    if _is_patched(AsyncLLM, "add_request"):
        return
    vllm_add_request = AsyncLLM.add_request

    async def add_request(self, request_id, prompt, params, arrival_time=None,
                          lora_request=None, *args, **kwargs):
        from vllm_deepthink import serving

        params, lora_request = serving.to_engine_request(params, lora_request)
        return await vllm_add_request(self, request_id, prompt, params, arrival_time,
                                      lora_request, *args, **kwargs)

    _replace(AsyncLLM, "add_request", add_request)


def patch_serving_models_list() -> None:
    """vllm/entrypoints/openai/models/serving.py: OpenAIServingModels.show_available_models.

    /v1/models lists each served adapter like a LoRA module: id = name,
    parent = base model, root = adapter path.
    """
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    if _is_patched(OpenAIServingModels, "show_available_models"):
        return
    vllm_show_available_models = OpenAIServingModels.show_available_models

    async def show_available_models(self):
        from vllm_deepthink import serving

        model_list = await vllm_show_available_models(self)
        model_list.data.extend(serving.model_cards(self))
        return model_list

    _replace(OpenAIServingModels, "show_available_models", show_available_models)


def patch_api_routers() -> None:
    """vllm/entrypoints/launchers/app.py: register_api_routers, the name build_app calls.

    Adds POST /v1/load_deepthink_adapter and /v1/unload_deepthink_adapter when
    VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING is true (serving_routes.py), like vLLM's
    LoRA routes. Not an endpoint plugin: those load only when named in
    VLLM_PLUGINS, a second switch next to the environment variable.
    """
    from vllm.entrypoints.launchers import app as app_module

    if _is_patched(app_module, "register_api_routers"):
        return
    vllm_register_api_routers = app_module.register_api_routers

    def register_api_routers(args, app, supported_tasks, model_config=None):
        vllm_register_api_routers(args, app, supported_tasks, model_config)
        if "generate" in (supported_tasks or ()):
            from vllm_deepthink import serving_routes

            serving_routes.attach_router(app)

    _replace(app_module, "register_api_routers", register_api_routers)


def apply_serving() -> None:
    """Apply the OpenAI-server patches (idempotent)."""
    patch_engine_args_add_cli_args()
    patch_engine_args_from_cli_args()
    patch_serving_check_model()
    patch_serving_maybe_get_adapters()
    patch_async_llm_add_request()
    patch_serving_models_list()
    patch_api_routers()

