"""Output-side state of an adapter request: what the client sees is the query alone.

`RequestState` (vllm/v1/engine/output_processor.py) and `LogprobsProcessor`
(vllm/v1/engine/logprobs.py) subclasses, installed for adapter requests by
patches.engine.patch_request_state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.v1.engine.logprobs import LogprobsProcessor
from vllm.v1.engine.output_processor import RequestState
from vllm.v1.outputs import LogprobsTensors

from vllm_deepthink.plugin.connector.stats import FRONTEND_COSTS, cost_clock_ns


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
        start = cost_clock_ns()
        rows = prompt_logprobs_tensors.logprobs.shape[0]
        skip = max(0, rows - self.query_rows)
        self.query_rows -= rows - skip
        if skip == rows:
            FRONTEND_COSTS.since("output", start)
            return
        token_ids, logprobs, ranks = prompt_logprobs_tensors[:3]
        trimmed = LogprobsTensors(token_ids[skip:], logprobs[skip:], ranks[skip:])
        FRONTEND_COSTS.since("output", start)
        super()._update_prompt_logprobs(trimmed)
