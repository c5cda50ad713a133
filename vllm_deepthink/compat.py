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
)


def original(owner: type, attribute: str) -> Callable:
    """vLLM's own implementation of a (possibly patched) callable."""
    current = owner.__dict__[attribute]
    func = current.__func__ if isinstance(current, classmethod) else current
    return getattr(func, _ORIGINAL, func)


def _is_patched(owner: type, attribute: str) -> bool:
    current = owner.__dict__[attribute]
    func = current.__func__ if isinstance(current, classmethod) else current
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
    """Drops the prompt-logprob rows of the adapter's placeholder positions.

    The engine returns one row per prompt position but the last ([L + q - 1]
    rows, row i scoring prompt token i + 1); rows 0..L-1 belong to positions
    that were loaded, not computed, and hold uninitialised memory (garbage token
    ids crash detokenisation). Row L-1 would score the first query token from
    the placeholder's hidden state, which does not exist: like any first prompt
    token it gets None. Dropping L rows leaves exactly the query's rows.
    """

    prompt_rows_to_skip: int = 0

    @classmethod
    def wrap(cls, processor: LogprobsProcessor, rows_to_skip: int) -> QueryOnlyLogprobsProcessor:
        values = {f.name: getattr(processor, f.name) for f in dataclasses.fields(processor)}
        return cls(**values, prompt_rows_to_skip=rows_to_skip)

    def _update_prompt_logprobs(self, prompt_logprobs_tensors: LogprobsTensors) -> None:
        rows = prompt_logprobs_tensors.logprobs.shape[0]
        skip = min(self.prompt_rows_to_skip, rows)
        self.prompt_rows_to_skip -= skip
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
            state.logprobs_processor = QueryOnlyLogprobsProcessor.wrap(processor, prefix_len)
        return state

    setattr(from_new_request, _ORIGINAL, vllm_from_new_request)
    RequestState.from_new_request = classmethod(from_new_request)


def local_hit_cap(request: Any, block_size: int) -> int | None:
    """The longest local prefix-cache hit an adapter request may take, or None.

    A prompt-logprob request must compute every query position (the runner has
    no logprobs for cached ones), so its local hit stops at the adapter's last
    full block; the connector loads the rest of the prefix.
    """
    kv_params = getattr(request, "kv_transfer_params", None)
    entry = kv_params.get(frontend.PARAMS_KEY) if isinstance(kv_params, dict) else None
    if not isinstance(entry, dict):
        return None
    params = request.sampling_params
    if params is None or params.prompt_logprobs is None:
        return None
    return int(entry["prefix_len"]) // block_size * block_size


def patch_kv_cache_manager() -> None:
    """vllm/v1/core/kv_cache_manager.py: KVCacheManager.get_computed_blocks.

    Caps the local prefix-cache hit of prompt-logprob adapter requests at the
    adapter's full blocks (local_hit_cap). Without it the same query sent twice
    hits its own cached blocks past L and those query rows get no logprobs.
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


def apply_all() -> None:
    """Apply every patch (idempotent)."""
    patch_input_processor()
    patch_request_state()
    patch_kv_cache_manager()
