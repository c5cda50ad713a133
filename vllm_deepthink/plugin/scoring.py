"""Choice scoring with a vLLM engine: the plan of tasks/scoring.py (make_plan), same
numbers as its HF scorer.

A NEXT unit (the single-token choices of an item) is one request: [prefix ids] +
query ids with `max_tokens=1, logprob_token_ids=<the choice tokens>`; the first
generated position's raw logprobs of those tokens are the scores. It reads the
prefix cache like any generation request, so ICL demonstrations are computed once
per engine.

A FORCED unit (one multi-token choice) is one request: [prefix ids] + query ids +
choice ids with `prompt_logprobs=0`; the score is the sum of the prompt logprobs at
the choice's positions. A plain request (zero-shot, ICL) reads the prefix cache up
to the block before its choice (`skip_reading_prefix_cache=False` and
extra_args[SCORED_FROM_ARG], capped by patches.engine.local_hit_cap), so
demonstrations and the query shared by an item's choices are not recomputed. The cap
acts on engines that run the DeepThink connector only (make_engine always configures
it); on another engine such a request does not read the prefix cache (vLLM's default
for prompt logprobs). With a
Deep-Thinking adapter the prompt is query (+ choice) ids only: the plugin puts the
adapter's K/V in front (positions 0..L-1).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_deepthink.plugin import api, protocol
from vllm_deepthink.tasks.scoring import NEXT, EncodedItem, Score, ScoringPlan, make_plan


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


def score_plan_vllm(llm, plan: ScoringPlan, *, prefix_ids: Sequence[int] | None = None,
                    adapter: str | None = None, progress: bool = False) -> list[list[Score]]:
    """Run a scoring plan (tasks.scoring.make_plan) through a `vllm.LLM`.

    Args:
        llm: a `vllm.LLM` (make_engine); with `adapter`, built with that adapter.
        plan: the units of the items to score.
        prefix_ids: ids put before every query (ICL demos); not with `adapter`.
        adapter: name of a Deep-Thinking adapter the engine serves.
    """
    if adapter is not None and prefix_ids:
        raise ValueError("give either prefix_ids (ICL) or adapter (Deep-Thinking), not both")
    prefix = list(prefix_ids or [])
    capped = protocol.uses_deepthink_connector(llm.llm_engine.vllm_config)
    prompts, params = [], []
    for unit in plan.units:
        prompts.append({"prompt_token_ids": prefix + unit.ids})
        if unit.kind == NEXT:
            params.append(_next_token_params(adapter, [t for _, t, _ in unit.entries]))
        else:
            params.append(_choice_params(adapter, len(prefix) + unit.scored_from, capped))
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    totals = [[0.0] * len(lengths) for lengths in plan.choice_lengths]
    for prompt, unit, out in zip(prompts, plan.units, outputs):
        ids = prompt["prompt_token_ids"]
        if unit.kind == NEXT:
            (step,) = out.outputs[0].logprobs
            for _, target, j in unit.entries:
                totals[unit.item][j] += step[target].logprob
            continue
        # The choice's rows are the list's last `length` (a runner may leave out
        # rows of cached positions instead of returning them empty).
        length = len(unit.entries)
        logprobs = out.prompt_logprobs
        if logprobs is None or len(logprobs) < length + 1:
            raise RuntimeError(f"vLLM returned {None if logprobs is None else len(logprobs)} "
                               f"prompt logprobs for a {len(ids)}-token prompt scored from "
                               f"position {len(prefix) + unit.scored_from}")
        rows = logprobs[len(logprobs) - length:]
        for row, (_, target, j) in zip(rows, unit.entries):
            totals[unit.item][j] += row[target].logprob
    return [[(totals[i][j], n) for j, n in enumerate(lengths)]
            for i, lengths in enumerate(plan.choice_lengths)]


class VllmScorer:
    """score(encoded, prefix_ids=..., adapter=...) with one vLLM engine."""

    engine = "vllm"

    def __init__(self, llm, progress: bool = False):
        self.llm, self.progress = llm, progress

    def score(self, encoded: Sequence[EncodedItem], *, prefix_ids: Sequence[int] | None = None,
              adapter: str | None = None) -> list[list[Score]]:
        plan = encoded if isinstance(encoded, ScoringPlan) else make_plan(encoded)
        return score_plan_vllm(self.llm, plan, prefix_ids=prefix_ids, adapter=adapter,
                               progress=self.progress)

    def close(self) -> None:
        """Stop the engine's processes now (instead of at interpreter exit)."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
