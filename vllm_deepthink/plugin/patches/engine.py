"""Patches of the engine that `LLM` and `vllm serve` share, one function per patch.

Each acts only on adapter requests (those carrying our kv_transfer_params entry or
selecting an adapter) of an engine that runs the DeepThink connector; every other
request, and every engine without the connector, takes vLLM's own path.
"""

from __future__ import annotations

import copy
from typing import Any

from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams
from vllm.utils.ompmultiprocessing import OMPProcessManager
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import RequestState

from vllm_deepthink.plugin import frontend, protocol
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
        PatchSpec(KVCacheManager, "get_computed_blocks", "vllm/v1/core/kv_cache_manager.py",
                  ("self", "request")),
        PatchSpec(OMPProcessManager, "__init__", "vllm/utils/ompmultiprocessing.py",
                  ("self", "config")),
    )


def patch_input_processor() -> None:
    """vllm/v1/engine/input_processor.py: InputProcessor.process_inputs.

    The one frontend entry both `LLM` and `AsyncLLM` pass through (AsyncLLM's
    process_inputs_async wraps the bound method at construction, after plugins
    load). Rewrites an adapter request into placeholder + query token ids, the
    adapter's cache salt and kv_transfer_params (frontend.rewrite_request), then
    lets vLLM validate and build the EngineCoreRequest as usual.
    """
    if is_patched(InputProcessor, "process_inputs"):
        return
    vllm_process_inputs = original(InputProcessor, "process_inputs")

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

    replace(InputProcessor, "process_inputs", process_inputs)


def patch_request_state() -> None:
    """vllm/v1/engine/output_processor.py: RequestState.from_new_request.

    Outputs never show the placeholders: for an adapter request the state is
    built from the query ids alone (prompt_token_ids, detokenizer context,
    prompt_len), prompt logprobs drop the placeholder rows and num_cached_tokens
    counts the query only. The request sent to the engine core is not touched.
    """
    if is_patched(RequestState, "from_new_request"):
        return
    vllm_from_new_request = original(RequestState, "from_new_request")

    def from_new_request(cls, tokenizer, request, prompt, parent_req, request_index,
                         queue, log_stats, stream_interval):
        entry = (protocol.params_transfer_entry(request.sampling_params)
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

    replace(RequestState, "from_new_request", from_new_request, classmethod)


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
    entry = protocol.transfer_entry(getattr(request, "kv_transfer_params", None))
    if entry is not None:
        return int(entry["prefix_len"]) // block_size * block_size
    scored_from = (params.extra_args or {}).get(protocol.SCORED_FROM_ARG)
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
    if is_patched(KVCacheManager, "get_computed_blocks"):
        return
    vllm_get_computed_blocks = original(KVCacheManager, "get_computed_blocks")

    def get_computed_blocks(self, request):
        blocks, num_computed, shared_prefix_boundary = vllm_get_computed_blocks(self, request)
        block_size = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        cap = local_hit_cap(request, block_size)
        if cap is not None and num_computed > cap:
            blocks = self.truncate_computed_blocks(blocks, cap)
            num_computed = cap
            shared_prefix_boundary = min(shared_prefix_boundary, cap)
        return blocks, num_computed, shared_prefix_boundary

    replace(KVCacheManager, "get_computed_blocks", get_computed_blocks)


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
    (measured: about 3x slower than the same engine without a connector). For our
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


def apply() -> None:
    """Apply the engine patches (idempotent)."""
    patch_input_processor()
    patch_request_state()
    patch_kv_cache_manager()
    patch_cpu_core_reservation()
