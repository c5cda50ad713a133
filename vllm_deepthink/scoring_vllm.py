"""Choice scoring with a vLLM engine (prompt logprobs), same numbers as scoring.py.

One prompt per (item, choice): [prefix ids] + query ids + choice ids, sent as token
ids with `SamplingParams(max_tokens=1, prompt_logprobs=0)`; the choice's score is the
sum of the prompt logprobs at its positions. With a Deep-Thinking adapter the prompt
is query + choice ids only: the plugin puts the adapter's K/V in front (positions
0..L-1) and the returned prompt logprobs cover the sent tokens.

Plain prompts (zero-shot, ICL) keep vLLM's default for prompt-logprob requests,
which does not read the prefix cache: every position is computed, so no cached
position can come back without its logprob.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_deepthink.scoring import EncodedItem, Score


def make_engine(model: str | Path, *, adapters: Mapping[str, str | Path] | None = None,
                max_model_len: int = 2048, **engine_kwargs: Any):
    """A `vllm.LLM` for scoring: float32, prefix caching on, adapters if given.

    On CPU set VLLM_CPU_KVCACHE_SPACE (GiB) before calling; it defaults to 1 here.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kwargs = dict(model=str(model), dtype="float32", max_model_len=max_model_len,
                  enable_prefix_caching=True, enforce_eager=True, seed=0)
    kwargs.update(engine_kwargs)
    if adapters:
        import vllm_deepthink

        kwargs = vllm_deepthink.engine_args(adapters=dict(adapters), **kwargs)
    return LLM(**kwargs)


def _sampling_params(adapter: str | None):
    params = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    if adapter is None:
        from vllm import SamplingParams

        return SamplingParams(**params)
    import vllm_deepthink

    return vllm_deepthink.sampling_params(adapter=adapter, **params)


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
    prompts, spans = [], []
    for i, item in enumerate(encoded):
        if not item.query_ids:
            raise ValueError(f"item {i}: the query tokenizes to no tokens; every item "
                             f"needs a non-empty query.")
        for choice in item.choice_ids:
            start = len(prefix) + len(item.query_ids)
            prompts.append({"prompt_token_ids": prefix + item.query_ids + choice})
            spans.append((start, len(choice)))
    outputs = llm.generate(prompts, _sampling_params(adapter), use_tqdm=progress)
    flat: list[Score] = []
    for prompt, (start, length), out in zip(prompts, spans, outputs):
        ids = prompt["prompt_token_ids"]
        logprobs = out.prompt_logprobs
        if logprobs is None or len(logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {None if logprobs is None else len(logprobs)} "
                               f"prompt logprobs for a {len(ids)}-token prompt")
        total = 0.0
        for pos in range(start, start + length):
            total += logprobs[pos][ids[pos]].logprob
        flat.append((total, length))
    scores, k = [], 0
    for item in encoded:
        scores.append(flat[k:k + len(item.choice_ids)])
        k += len(item.choice_ids)
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
