"""Choice scoring with HF transformers: log-probability of each continuation.

Conventions (docs/DESIGN.md): query ids = tok(query, add_special_tokens=False),
choice ids = tok(choice, add_special_tokens=False) (a choice carries its own leading
space), and a choice's score is the sum of the log-probabilities of its ids after
[prefix] + query ids. `acc` ranks choices by that sum, `acc_norm` by the mean per
token; the prediction is the argmax, ties going to the lowest index.

A prefix is either token ids (`prefix_ids`, plain ICL: demo ids, run once and
cached) or per-layer K/V tensors (`past_key_values`, a Deep-Thinking adapter).
Both become a batch-1 transformers cache that every batch copies, so the query
starts at position L in both cases and T=1 Deep-Thinking equals ICL.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm_deepthink.format import hf_cache
from vllm_deepthink.format.hf_config import text_config

Score = tuple[float, int]  # (sum of choice-token logprobs, number of choice tokens)


@dataclass
class ChoiceItem:
    query: str
    choices: list[str]
    label: int


@dataclass
class EncodedItem:
    query_ids: list[int]
    choice_ids: list[list[int]]


def items_from_rows(task, rows: Sequence[dict]) -> list[ChoiceItem]:
    return [ChoiceItem(task.format_query(r), task.choices(r), task.label(r)) for r in rows]


def encode_items(tokenizer, items: Sequence[ChoiceItem]) -> list[EncodedItem]:
    """Token ids of each query and choice, without special tokens."""
    encoded = []
    for n, item in enumerate(items):
        query_ids = tokenizer(item.query, add_special_tokens=False)["input_ids"]
        choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices]
        for c, ids in zip(item.choices, choice_ids):
            if not ids:
                raise ValueError(f"item {n}: choice {c!r} tokenizes to no tokens; every "
                                 f"choice needs at least one token to be scored.")
        encoded.append(EncodedItem(list(query_ids), [list(ids) for ids in choice_ids]))
    return encoded


def _prefix_cache(model, past_key_values, prefix_ids):
    """A batch-1 cache holding the prefix, or None; and its length L."""
    if past_key_values is not None and prefix_ids is not None:
        raise ValueError("give either past_key_values (an adapter) or prefix_ids (ICL "
                         "demonstrations), not both")
    if past_key_values is not None:
        dtype = model.get_input_embeddings().weight.dtype
        kv = [(k.to(model.device, dtype), v.to(model.device, dtype)) for k, v in past_key_values]
        return hf_cache.cache_from_kv(kv, model.config, batch_size=1), kv[0][0].shape[-2]
    if prefix_ids:
        ids = torch.tensor([list(prefix_ids)], device=model.device)  # [1, L]
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.past_key_values, ids.shape[1]
    return None, 0


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal-LM head on selected hidden states [N, hidden] -> [N, vocab] (float32)."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _forward_right_padded(model, seqs: list[list[int]], base_cache, prefix_len: int
                          ) -> torch.Tensor:
    """Last hidden states [B, S, hidden] of right-padded `seqs` after the prefix cache."""
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, S]; pads masked
    mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long)  # [B, L+S]
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.tensor(s)
        mask[row, :prefix_len + len(s)] = 1
    cache = None
    if base_cache is not None:
        # A forward mutates its cache: every batch gets its own copy of the prefix.
        cache = copy.deepcopy(base_cache)
        cache.batch_repeat_interleave(len(seqs))
    return model.base_model(input_ids=input_ids.to(model.device),
                            attention_mask=mask.to(model.device),
                            past_key_values=cache, use_cache=cache is not None
                            ).last_hidden_state


@torch.no_grad()
def score_encoded_hf(model, encoded: Sequence[EncodedItem], *, past_key_values=None,
                     prefix_ids: Sequence[int] | None = None, batch_size: int = 16,
                     progress: bool = False) -> list[list[Score]]:
    """Scores of pre-tokenized items; see score_items_hf."""
    for i, item in enumerate(encoded):
        if not item.query_ids:
            raise ValueError(f"item {i}: the query tokenizes to no tokens; the first choice "
                             f"token is predicted from the query's last token, so every "
                             f"item needs a non-empty query.")
    base_cache, prefix_len = _prefix_cache(model, past_key_values, prefix_ids)
    # Sequences to run, each with the (position, target token, item, choice) it scores.
    # An item whose choices are all one token needs only its query (the query's last
    # position predicts every choice); otherwise one sequence per choice.
    units: list[tuple[list[int], list[tuple[int, int, int, int]]]] = []
    for i, item in enumerate(encoded):
        q = len(item.query_ids)
        if all(len(c) == 1 for c in item.choice_ids):
            units.append((item.query_ids, [(q - 1, c[0], i, j)
                                           for j, c in enumerate(item.choice_ids)]))
            continue
        for j, choice in enumerate(item.choice_ids):
            units.append((item.query_ids + choice,
                          [(q + k - 1, t, i, j) for k, t in enumerate(choice)]))
    units.sort(key=lambda u: -len(u[0]))  # similar lengths share a batch: less padding
    totals = [[0.0] * len(item.choice_ids) for item in encoded]
    for start in tqdm(range(0, len(units), batch_size), desc="scoring (hf)",
                      disable=not progress):
        batch = units[start:start + batch_size]
        hidden = _forward_right_padded(model, [seq for seq, _ in batch], base_cache, prefix_len)
        rows = [row for row, (_, entries) in enumerate(batch) for _ in entries]
        entries = [e for _, unit_entries in batch for e in unit_entries]
        selected = hidden[torch.tensor(rows), torch.tensor([e[0] for e in entries])]  # [N, H]
        logprobs = torch.log_softmax(_logits(model, selected), dim=-1)  # [N, vocab]
        token_lp = logprobs[torch.arange(len(entries)), torch.tensor([e[1] for e in entries])]
        for (_, _, i, j), lp in zip(entries, token_lp.double().tolist()):
            totals[i][j] += lp
    return [[(totals[i][j], len(c)) for j, c in enumerate(item.choice_ids)]
            for i, item in enumerate(encoded)]


def score_items_hf(model, tokenizer, items: Sequence[ChoiceItem], *, past_key_values=None,
                   prefix_ids: Sequence[int] | None = None, batch_size: int = 16,
                   progress: bool = False) -> list[list[Score]]:
    """Per item, per choice: (sum of the choice tokens' logprobs, number of tokens).

    Args:
        model: an HF causal LM in eval mode.
        tokenizer: its tokenizer.
        items: queries with their candidate continuations.
        past_key_values: per layer (key, value), each [1, kv_heads, L, head_dim]: an
            adapter prefix; the query starts at position L.
        prefix_ids: token ids placed before every query (ICL demonstrations).
        batch_size: (item, choice) sequences per forward pass.
    """
    return score_encoded_hf(model, encode_items(tokenizer, items),
                            past_key_values=past_key_values, prefix_ids=prefix_ids,
                            batch_size=batch_size, progress=progress)


def predictions(scores: Sequence[Sequence[Score]], normalize: bool = False) -> list[int]:
    """Argmax choice per item (ties -> lowest index); by mean logprob if normalize."""
    preds = []
    for item in scores:
        values = [s / n if normalize else s for s, n in item]
        preds.append(max(range(len(values)), key=lambda k: (values[k], -k)))
    return preds


def accuracy(scores: Sequence[Sequence[Score]], labels: Sequence[int]) -> dict:
    """{"acc": by summed logprob, "acc_norm": by mean per token, "n": items}."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scored items but {len(labels)} labels")
    n = len(labels)
    if n == 0:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
    acc = sum(p == y for p, y in zip(predictions(scores), labels)) / n
    acc_norm = sum(p == y for p, y in zip(predictions(scores, normalize=True), labels)) / n
    return {"acc": acc, "acc_norm": acc_norm, "n": n}


class HFScorer:
    """score(encoded, prefix_ids=..., adapter=...) with an HF model; adapters by name."""

    engine = "hf"

    def __init__(self, model, adapters: dict | None = None, batch_size: int = 16,
                 progress: bool = False):
        self.model, self.batch_size, self.progress = model, batch_size, progress
        self.adapters = dict(adapters or {})  # name -> DeepThinkAdapter

    def score(self, encoded: Sequence[EncodedItem], *, prefix_ids: Sequence[int] | None = None,
              adapter: str | None = None) -> list[list[Score]]:
        past = None
        if adapter is not None:
            if adapter not in self.adapters:
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self.adapters)}")
            if prefix_ids:
                raise ValueError("give either prefix_ids (ICL) or adapter, not both")
            past = self.adapters[adapter].as_past_key_values(device=self.model.device)
        return score_encoded_hf(self.model, encoded, past_key_values=past,
                                prefix_ids=prefix_ids, batch_size=self.batch_size,
                                progress=self.progress)
