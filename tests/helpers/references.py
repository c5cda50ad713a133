"""HF reference results: the ground truth every vLLM parity test compares against.

The reference of an adapter is `model(query, past_key_values=adapter)`; the others
(beam search, repetition penalty) re-implement vLLM's rule on HF logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_deepthink.format import DeepThinkAdapter


def prefix_cache(model, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """A fresh transformers cache holding per-layer [kv_heads, L, D] K/V."""
    from transformers import DynamicCache

    return DynamicCache([(k.unsqueeze(0).clone(), v.unsqueeze(0).clone())
                         for k, v in zip(keys, values)], config=model.config)


@dataclass
class Reference:
    """HF results for one query: logprob of query token j (j >= 1) given the
    prefix and the query before it, and the greedy continuation."""

    prompt_logprobs: list[float]
    greedy_tokens: list[int]


def hf_reference(model, adapter: DeepThinkAdapter | None, query_ids: list[int],
                 num_greedy: int = 16) -> Reference:
    """`model(query, past_key_values=adapter)`; adapter None = no prefix."""
    cache = (prefix_cache(model, adapter.keys, adapter.values) if adapter is not None
             else None)
    with torch.no_grad():
        out = model(torch.tensor([query_ids]), past_key_values=cache, use_cache=True)
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)     # [q, vocab]
        prompt = [logprobs[j - 1, query_ids[j]].item() for j in range(1, len(query_ids))]
        cache = out.past_key_values
        greedy = []
        next_id = int(logprobs[-1].argmax())
        for _ in range(num_greedy):
            greedy.append(next_id)
            out = model(torch.tensor([[next_id]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
    return Reference(prompt_logprobs=prompt, greedy_tokens=greedy)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), f"lengths differ: {len(a)} vs {len(b)}"
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def icl_reference(model, adapter: DeepThinkAdapter, query_ids: list[int],
                  num_greedy: int = 16) -> Reference:
    """HF result of the plain prompt demo ids + query ids (no adapter)."""
    ids = list(adapter.config.demo_token_ids) + list(query_ids)
    full = hf_reference(model, None, ids, num_greedy=num_greedy)
    start = len(adapter.config.demo_token_ids)
    return Reference(prompt_logprobs=full.prompt_logprobs[start:],
                     greedy_tokens=full.greedy_tokens)


def hf_next_logits(model, adapter: DeepThinkAdapter | None, ids: list[int]) -> torch.Tensor:
    """[vocab] next-token logits after `ids`, with the adapter's K/V as the prefix
    (adapter None: no prefix)."""
    cache = prefix_cache(model, adapter.keys, adapter.values) if adapter is not None else None
    with torch.no_grad():
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=cache is not None)
    return out.logits[0, -1].float()


def hf_beam_search(model, adapter: DeepThinkAdapter | None, query_ids: list[int],
                   beam_width: int, max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """vLLM's online beam search (vllm/entrypoints/generate/beam_search/online.py) with
    ignore_eos and length_penalty 1, on HF logprobs: each step takes the 2 * beam_width
    best next tokens of every beam and keeps the beam_width best sums; the final beams
    are sorted by sum / length. Returns, best first, (generated ids, logprob of each)."""
    beams: list[tuple[float, list[int], list[float]]] = [(0.0, [], [])]
    for _ in range(max_tokens):
        candidates = []
        for cum, generated, logprobs in beams:
            step = torch.log_softmax(hf_next_logits(model, adapter, query_ids + generated), -1)
            top = torch.topk(step, 2 * beam_width)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((cum + value, generated + [token], logprobs + [value]))
        candidates.sort(key=lambda c: c[0], reverse=True)
        beams = candidates[:beam_width]
    length = len(query_ids) + max_tokens
    beams.sort(key=lambda b: b[0] / length, reverse=True)
    return [(generated, logprobs) for _, generated, logprobs in beams]


def hf_greedy_with_repetition_penalty(model, adapter: DeepThinkAdapter | None,
                                      query_ids: list[int], num_tokens: int, penalty: float,
                                      extra_prompt_ids: list[int]) -> list[int]:
    """Greedy decoding with vLLM's repetition penalty (vllm/model_executor/layers/utils.py
    apply_penalties: the logit of a token seen in the prompt or the output is divided by
    the penalty when positive, multiplied when negative). The prompt's tokens, for the
    penalty, are `extra_prompt_ids` + query ids."""
    generated: list[int] = []
    for _ in range(num_tokens):
        logits = hf_next_logits(model, adapter, list(query_ids) + generated).clone()
        seen = sorted(set(extra_prompt_ids) | set(query_ids) | set(generated))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        generated.append(int(logits.argmax()))
    return generated
