"""Patches of the engine that `LLM` and `vllm serve` share, one function per patch.

Each acts only on an engine that runs the DeepThink connector (and there only on
adapter requests, or on the plugin's own request fields); on every engine without
the connector each patched callable is vLLM's own, byte for byte. Client values are
validated in the frontend process (patch_input_processor); the scheduler-side patch
reads them through protocol's readers, which never raise.
"""

from __future__ import annotations

import copy
from typing import Any

from vllm.config import VllmConfig
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams
from vllm.utils.ompmultiprocessing import OMPProcessManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import RequestState

from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector.stats import FRONTEND_COSTS, cost_clock_ns
from vllm_deepthink.plugin.registry import connector_configured, registry_for
from vllm_deepthink.plugin.request_checks import (AdapterRequestError, UnknownAdapterError,
                                                  check_request)
from vllm_deepthink.plugin.rewrite import rewrite_request, wrote
from vllm_deepthink.plugin.patches.base import PatchSpec, is_patched, original, replace
from vllm_deepthink.plugin.request_state import QueryOnlyLogprobsProcessor, QueryOnlyRequestState

logger = init_logger(__name__)


def patch_specs() -> tuple[PatchSpec, ...]:
    return (
        PatchSpec(InputProcessor, "process_inputs", "vllm/v1/engine/input_processor.py",
                  ("self", "request_id", "prompt", "params", "supported_tasks", "arrival_time",
                   "lora_request", "tokenization_kwargs", "trace_headers", "priority",
                   "data_parallel_rank", "resumable", "session_id", "kv_hints")),
        PatchSpec(RequestState, "from_new_request", "vllm/v1/engine/output_processor.py",
                  ("tokenizer", "request", "prompt", "parent_req", "request_index", "queue",
                   "log_stats", "stream_interval")),
        PatchSpec(Scheduler, "_get_local_prefix_cache_hit", "vllm/v1/core/sched/scheduler.py",
                  ("self", "request")),
        PatchSpec(OMPProcessManager, "__init__", "vllm/utils/ompmultiprocessing.py",
                  ("self", "config")),
        PatchSpec(VllmConfig, "_resolve_mm_embedding_inputs", "vllm/config/vllm.py",
                  ("self",)),
    )


class AdapterValidationError(VLLMValidationError, AdapterRequestError):
    """AdapterRequestError as vLLM's validation error: HTTP 400 with the message
    (AsyncLLM.generate re-raises VLLMClientError as is; any other exception becomes
    EngineGenerateError, a 500 with an empty message)."""


class AdapterNotFoundError(VLLMNotFoundError, AdapterRequestError):
    """UnknownAdapterError as vLLM's not-found error: HTTP 404."""


def client_error(exc: AdapterRequestError) -> AdapterRequestError:
    """The vLLM client error (also an AdapterRequestError) carrying exc's message."""
    if isinstance(exc, (AdapterValidationError, AdapterNotFoundError)):
        return exc
    if isinstance(exc, UnknownAdapterError):
        error = AdapterNotFoundError(str(exc))
    else:
        error = AdapterValidationError(str(exc), parameter=exc.param)
    error.param = exc.param
    return error


def patch_input_processor() -> None:
    """vllm/v1/engine/input_processor.py: InputProcessor.process_inputs.

    The one frontend entry both `LLM` and `AsyncLLM` pass through (AsyncLLM's
    process_inputs_async wraps the bound method at construction, after plugins
    load). On an engine with our connector: validates the plugin's request fields
    (request_checks.check_request) and rewrites an adapter request into placeholder +
    query token ids, the adapter's cache salt and kv_transfer_params
    (rewrite.rewrite_request), then lets vLLM validate and build the
    EngineCoreRequest as usual. Errors are vLLM client errors (400, 404 for an
    unknown adapter). Without our connector: vLLM's own method, untouched.
    """
    if is_patched(InputProcessor, "process_inputs"):
        return
    vllm_process_inputs = original(InputProcessor, "process_inputs")

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if not isinstance(params, SamplingParams):
            return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        if not protocol.uses_deepthink_connector(self.vllm_config):
            if isinstance(params.extra_args, dict) and protocol.ADAPTER_ARG in params.extra_args:
                logger.warning_once(
                    "vllm-deepthink: extra_args[%r] is ignored: this engine does not run the "
                    "DeepThink connector (build it with vllm_deepthink.engine_args(...) or "
                    "start `vllm serve` with --deepthink-adapter).", protocol.ADAPTER_ARG)
            return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)
        start = cost_clock_ns()
        lora_request = kwargs.get("lora_request", args[2] if len(args) > 2 else None)
        try:
            name = check_request(prompt, params, lora_request)
            if name is not None:
                if kwargs.get("resumable"):
                    raise AdapterRequestError(
                        "streaming-input (resumable) requests cannot use a Deep-Thinking "
                        "adapter")
                info = registry_for(self.vllm_config).get(name)
                prompt, params = rewrite_request(
                    info, prompt, params, self.tokenizer, self.model_config.max_model_len)
        except AdapterRequestError as exc:
            raise client_error(exc) from None
        FRONTEND_COSTS.since("frontend", start, requests=int(name is not None))
        return vllm_process_inputs(self, request_id, prompt, params, *args, **kwargs)

    replace(InputProcessor, "process_inputs", process_inputs)


def patch_request_state() -> None:
    """vllm/v1/engine/output_processor.py: RequestState.from_new_request.

    Outputs never show the placeholders: for an adapter request the state is
    built from the query ids alone (prompt_token_ids, detokenizer context,
    prompt_len), prompt logprobs drop the placeholder rows and num_cached_tokens
    counts the query only. The request sent to the engine core is not touched. Inert
    unless an engine of this process runs our connector (the output processor has no
    VllmConfig: registry.connector_configured), and then only entries this process's
    frontend wrote count (rewrite.wrote): a kv_transfer_params entry a client sends to
    an engine without our connector changes nothing.
    """
    if is_patched(RequestState, "from_new_request"):
        return
    vllm_from_new_request = original(RequestState, "from_new_request")

    def from_new_request(cls, tokenizer, request, prompt, parent_req, request_index,
                         queue, log_stats, stream_interval):
        start = cost_clock_ns()
        entry = (protocol.params_transfer_entry(request.sampling_params)
                 if request.sampling_params is not None and connector_configured()
                 else None)
        if not wrote(entry):
            return vllm_from_new_request(
                cls, tokenizer=tokenizer, request=request, prompt=prompt,
                parent_req=parent_req, request_index=request_index, queue=queue,
                log_stats=log_stats, stream_interval=stream_interval)
        prefix_len = entry.prefix_len
        query_request = copy.copy(request)
        query_request.prompt_token_ids = list(request.prompt_token_ids[prefix_len:])
        vllm_start = cost_clock_ns()
        state = vllm_from_new_request(
            QueryOnlyRequestState, tokenizer=tokenizer, request=query_request,
            prompt=prompt, parent_req=parent_req, request_index=request_index,
            queue=queue, log_stats=log_stats, stream_interval=stream_interval)
        vllm_ns = cost_clock_ns() - vllm_start
        state.prefix_len = prefix_len
        processor = state.logprobs_processor
        if processor is not None and processor.prompt_logprobs is not None:
            state.logprobs_processor = QueryOnlyLogprobsProcessor.wrap(
                processor, len(query_request.prompt_token_ids))
        # Ours: everything but vLLM's own state building (which any request costs).
        FRONTEND_COSTS.since("output", start + vllm_ns, requests=1)
        return state

    replace(RequestState, "from_new_request", from_new_request, classmethod)


def local_hit_cap(request: Any, block_size: int) -> int | None:
    """The longest local prefix-cache hit a prompt-logprob request may take, or None.

    The runner has no logprobs for cached positions, so a prompt-logprob request
    must compute every position it scores. An adapter request's local hit stops at
    the adapter's last full block (the connector loads the rest of the prefix). A
    plain request with extra_args[SCORED_FROM_ARG] = s (it reads the prefix cache,
    skip_reading_prefix_cache=False) stops at the last full block before s - 1,
    whose hidden state scores token s. Other requests: no cap.

    Runs inside Scheduler.schedule, where an exception kills the engine: it never
    raises. Values are read through protocol's readers (validated, a malformed value
    reads as absent); the frontend has refused malformed ones already.
    """
    params = getattr(request, "sampling_params", None)
    if params is None or getattr(params, "prompt_logprobs", None) is None:
        return None
    entry = protocol.transfer_entry(getattr(request, "kv_transfer_params", None))
    if entry is not None:
        return entry.prefix_len // block_size * block_size
    scored_from = protocol.scored_from(params)
    if scored_from is None:
        return None
    return max(0, scored_from - 1) // block_size * block_size


def patch_local_prefix_cache_hit() -> None:
    """vllm/v1/core/sched/scheduler.py: Scheduler._get_local_prefix_cache_hit.

    On a scheduler that runs our connector, caps the local prefix-cache hit of
    prompt-logprob requests (local_hit_cap): adapter requests at the adapter's full
    blocks (without it the same query sent twice hits its own cached blocks past L
    and those query rows get no logprobs), scoring requests before the positions they
    score. Any other scheduler (no connector, another connector, an attention-free
    model) gets vLLM's own result untouched.
    """
    if is_patched(Scheduler, "_get_local_prefix_cache_hit"):
        return
    vllm_local_hit = original(Scheduler, "_get_local_prefix_cache_hit")

    def _get_local_prefix_cache_hit(self, request):
        hit = vllm_local_hit(self, request)
        if not protocol.uses_deepthink_connector(self.vllm_config):
            return hit
        blocks, num_computed, shared_prefix_boundary, diverged = hit
        cap = local_hit_cap(request, self.block_size)
        if cap is not None and num_computed > cap:
            blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, cap)
            num_computed = cap
            shared_prefix_boundary = min(shared_prefix_boundary, cap)
        return blocks, num_computed, shared_prefix_boundary, diverged

    replace(Scheduler, "_get_local_prefix_cache_hit", _get_local_prefix_cache_hit)


class _ConfigWithoutKVConnector:
    """A read-only view of a VllmConfig whose kv_transfer_config is None."""

    kv_transfer_config = None

    def __init__(self, config: Any):
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def patch_cpu_core_reservation() -> None:
    """vllm/utils/ompmultiprocessing.py: OMPProcessManager.__init__ (CPU backend only).

    With any KV connector configured, vLLM's CPU backend reserves one more core per
    worker, meant for NIXL's transfer threads in prefill/decode disaggregation. The
    DeepThink connector runs inside the forward pass on the worker's own threads, so
    that core would idle; on 2 cores the reservation exceeds the machine, vLLM then
    reserves none and the worker's OpenMP threads share a core with the scheduler
    (much slower; results/README.md, "Throughput"). For our
    connector the reservation is computed as without a connector;
    VLLM_CPU_NUM_OF_RESERVED_CPU still overrides it.
    """
    if is_patched(OMPProcessManager, "__init__"):
        return
    vllm_init = original(OMPProcessManager, "__init__")

    def __init__(self, config):
        vllm_init(self, _ConfigWithoutKVConnector(config)
                  if protocol.uses_deepthink_connector(config) else config)

    replace(OMPProcessManager, "__init__", __init__)


def patch_mm_embedding_inputs() -> None:
    """vllm/config/vllm.py: VllmConfig._resolve_mm_embedding_inputs.

    vLLM turns on embedding inputs (enable_mm_embeds, allow_missing_mm_embeddings) for
    every kv_role="kv_consumer": a disaggregated decode node is sent pre-computed
    embeddings by its prefill node. Our connector is a consumer only so that the
    scheduler orders its loads after pending writes; it receives no embeddings, and a
    client must not send raw embeddings to a multimodal model that the operator did not
    open to them. For our connector the inputs resolve as without a KV connector
    (--enable-mm-embeds still turns them on); an EC consumer keeps vLLM's rule.
    """
    if is_patched(VllmConfig, "_resolve_mm_embedding_inputs"):
        return
    vllm_resolve = original(VllmConfig, "_resolve_mm_embedding_inputs")

    def _resolve_mm_embedding_inputs(self):
        vllm_resolve(_ConfigWithoutKVConnector(self)
                     if protocol.uses_deepthink_connector(self) else self)

    replace(VllmConfig, "_resolve_mm_embedding_inputs", _resolve_mm_embedding_inputs)


def apply() -> None:
    """Apply the engine patches (idempotent)."""
    patch_input_processor()
    patch_request_state()
    patch_local_prefix_cache_hit()
    patch_cpu_core_reservation()
    patch_mm_embedding_inputs()
