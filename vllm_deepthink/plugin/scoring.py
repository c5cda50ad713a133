"""Choice scoring with a vLLM engine, same numbers as tasks/scoring.py.

An item whose choices are all one token is one request: [prefix ids] + query ids
with `max_tokens=1, logprob_token_ids=<the choice tokens>`; the first generated
position's raw logprobs of those tokens are the scores. It reads the prefix cache
like any generation request, so ICL demonstrations are computed once per engine.

Otherwise one request per (item, choice): [prefix ids] + query ids + choice ids
with `prompt_logprobs=0`; the score is the sum of the prompt logprobs at the
choice's positions. A plain request (zero-shot, ICL) reads the prefix cache up to
the block before its choice (`skip_reading_prefix_cache=False` and
extra_args[SCORED_FROM_ARG], capped by patches.engine.local_hit_cap), so demonstrations and
the query shared by an item's choices are not recomputed. The cap acts on engines that
run the DeepThink connector only (make_engine always configures it); on another engine
such a request does not read the prefix cache (vLLM's default for prompt logprobs). With a Deep-Thinking
adapter the prompt is query (+ choice) ids only: the plugin puts the adapter's K/V
in front (positions 0..L-1).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_deepthink.plugin import api, protocol
from vllm_deepthink.tasks.scoring import EncodedItem, Score


def make_engine(model: str | Path, *, adapters: Mapping[str, str | Path] | None = None,
                max_model_len: int = 2048, **engine_kwargs: Any):
    """A `vllm.LLM` for scoring: float32, prefix caching on, the DeepThink connector
    (with `adapters`, if given; without, it still caps the prefix-cache reads of
    multi-token choices, see the module docstring).

    On CPU set VLLM_CPU_KVCACHE_SPACE (GiB) before calling; it defaults to 1 here.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kwargs = dict(model=str(model), dtype="float32", max_model_len=max_model_len,
                  enable_prefix_caching=True, enforce_eager=True, seed=0)
    kwargs.update(engine_kwargs)
    return LLM(**api.engine_args(adapters=dict(adapters or {}), **kwargs))


def _sampling_params(adapter: str | None, **params: Any):
    params = dict(max_tokens=1, temperature=0.0, detokenize=False, **params)
    if adapter is None:
        from vllm import SamplingParams

        return SamplingParams(**params)
    return api.sampling_params(adapter=adapter, **params)


def _next_token_params(adapter: str | None, token_ids: Sequence[int]):
    """Scores of single-token choices: raw logprobs of `token_ids` at the next position."""
    return _sampling_params(adapter, logprob_token_ids=sorted(set(token_ids)))


def _choice_params(adapter: str | None, start: int, capped: bool = True):
    """Prompt logprobs of the positions from `start` on (the choice tokens). `capped`:
    the engine caps prefix-cache reads (it runs the DeepThink connector), so a plain
    request may read the cache up to `start`."""
    if adapter is not None:
        return _sampling_params(adapter, prompt_logprobs=0)
    if not capped:
        return _sampling_params(None, prompt_logprobs=0)
    return _sampling_params(None, prompt_logprobs=0, skip_reading_prefix_cache=False,
                            extra_args={protocol.SCORED_FROM_ARG: start})


def score_encoded_vllm(llm, encoded: Sequence[EncodedItem], *,
                       prefix_ids: Sequence[int] | None = None, adapter: str | None = None,
                       progress: bool = False) -> list[list[Score]]:
    """Per item, per choice: (sum of the choice tokens' logprobs, number of tokens).

    Args:
        llm: a `vllm.LLM` (make_engine); with `adapter`, built with that adapter.
        encoded: token ids of queries and choices (scoring.encode_items).
        prefix_ids: ids put before every query (ICL demos); not with `adapter`.
        adapter: name of a Deep-Thinking adapter the engine serves.
    """
    if adapter is not None and prefix_ids:
        raise ValueError("give either prefix_ids (ICL) or adapter (Deep-Thinking), not both")
    prefix = list(prefix_ids or [])
    capped = protocol.uses_deepthink_connector(llm.llm_engine.vllm_config)
    prompts, params, reads = [], [], []  # reads: (item, choice or None, start, length)
    for i, item in enumerate(encoded):
        if not item.query_ids:
            raise ValueError(f"item {i}: the query tokenizes to no tokens; every item "
                             f"needs a non-empty query.")
        start = len(prefix) + len(item.query_ids)
        if all(len(c) == 1 for c in item.choice_ids):
            prompts.append({"prompt_token_ids": prefix + item.query_ids})
            params.append(_next_token_params(adapter, [c[0] for c in item.choice_ids]))
            reads.append((i, None, start, 1))
            continue
        for j, choice in enumerate(item.choice_ids):
            prompts.append({"prompt_token_ids": prefix + item.query_ids + choice})
            params.append(_choice_params(adapter, start, capped))
            reads.append((i, j, start, len(choice)))
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    scores: list[list[Score]] = [[(0.0, len(c)) for c in item.choice_ids] for item in encoded]
    for prompt, (i, j, start, length), out in zip(prompts, reads, outputs):
        ids = prompt["prompt_token_ids"]
        if j is None:
            (step,) = out.outputs[0].logprobs
            scores[i] = [(step[c[0]].logprob, 1) for c in encoded[i].choice_ids]
            continue
        # The choice's rows are the list's last `length` (a runner may leave out
        # rows of cached positions instead of returning them empty).
        logprobs = out.prompt_logprobs
        if logprobs is None or len(logprobs) < length + 1:
            raise RuntimeError(f"vLLM returned {None if logprobs is None else len(logprobs)} "
                               f"prompt logprobs for a {len(ids)}-token prompt scored from "
                               f"position {start}")
        rows = logprobs[len(logprobs) - length:]
        total = sum(row[token].logprob for row, token in zip(rows, ids[start:]))
        scores[i][j] = (total, length)
    return scores


class VllmScorer:
    """score(encoded, prefix_ids=..., adapter=...) with one vLLM engine."""

    engine = "vllm"

    def __init__(self, llm, progress: bool = False):
        self.llm, self.progress = llm, progress

    def score(self, encoded: Sequence[EncodedItem], *, prefix_ids: Sequence[int] | None = None,
              adapter: str | None = None) -> list[list[Score]]:
        return score_encoded_vllm(self.llm, encoded, prefix_ids=prefix_ids, adapter=adapter,
                                  progress=self.progress)

    def close(self) -> None:
        """Stop the engine's processes now (instead of at interpreter exit)."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
