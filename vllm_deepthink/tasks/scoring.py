"""Choice scoring: the scoring plan every scorer executes, and the HF scorer.

Conventions (docs/DESIGN.md): query ids = tok(query, add_special_tokens=False),
choice ids = tok(choice, add_special_tokens=False) (a choice carries its own leading
space), and a choice's score is the sum of the log-probabilities of its ids after
[prefix] + query ids. `acc` ranks choices by that sum, `acc_norm` by the mean per
token; the prediction is the argmax, ties going to the lowest index.

The plan (`make_plan`, shared with plugin/scoring.py's vLLM scorer): per item,

- one NEXT unit when some choices are a single token: the query ids; the query's
  last position predicts the (first and only) token of each of those choices;
- one FORCED unit per multi-token choice: query + choice ids, teacher-forced; the
  positions q-1 .. q+n-2 predict the choice's n tokens.

A scorer runs the units and sums each entry's log-probability into its (item,
choice) slot. The HF scorer (`score_plan`) runs each item's NEXT entries inside the
item's first FORCED unit when it has one (its ids start with the query), so an item
costs one sequence per multi-token choice and at least one; the vLLM scorer sends a
NEXT unit as one `logprob_token_ids` request and a FORCED unit as one prompt-logprobs
request.

A prefix is either token ids (`prefix_ids`, plain ICL: run once) or per-layer K/V
tensors (`past_key_values`, a Deep-Thinking adapter or iterate). Every batch reads
the batch-1 prefix expanded to the batch without a copy (hf_cache.shared_prefix_cache),
so the query starts at position L in both cases and T=1 Deep-Thinking equals ICL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

from vllm_deepthink.format import hf_cache
from vllm_deepthink.format.hf_config import text_config

Score = tuple[float, int]  # (sum of choice-token logprobs, number of choice tokens)
NEXT, FORCED = "next", "forced"


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


# ----------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ScoringUnit:
    """One sequence to run after the prefix and the log-probabilities it yields.

    ids: token ids after the prefix (the query, + a choice for FORCED).
    entries: (position in ids, target token id, choice index): the log-probability
        of `target` predicted at `position` goes to choice `choice` of `item`.
        NEXT: every position is the last one (len(ids) - 1), targets are arbitrary.
        FORCED: target == ids[position + 1] and the positions are the last
        len(entries) + 1 ones but the final: the continuation is teacher-forced.
    """

    item: int
    kind: str
    ids: list[int]
    entries: list[tuple[int, int, int]]

    @property
    def scored_from(self) -> int:
        """Index in ids of the first token whose log-probability is read (FORCED)."""
        return min(p for p, _, _ in self.entries) + 1


@dataclass(frozen=True)
class ScoringPlan:
    """The units of a list of items (see the module docstring); build once, run often."""

    units: list[ScoringUnit]
    choice_lengths: list[list[int]]  # [item][choice] -> number of choice tokens


def make_plan(encoded: Sequence[EncodedItem]) -> ScoringPlan:
    """The units that score every choice of every item (pure)."""
    units: list[ScoringUnit] = []
    for i, item in enumerate(encoded):
        q = len(item.query_ids)
        if q == 0:
            raise ValueError(f"item {i}: the query tokenizes to no tokens; the first choice "
                             f"token is predicted from the query's last token, so every "
                             f"item needs a non-empty query.")
        single = [(q - 1, c[0], j) for j, c in enumerate(item.choice_ids) if len(c) == 1]
        if single:
            units.append(ScoringUnit(i, NEXT, list(item.query_ids), single))
        for j, choice in enumerate(item.choice_ids):
            if len(choice) > 1:
                units.append(ScoringUnit(i, FORCED, list(item.query_ids) + list(choice),
                                         [(q + k - 1, t, j) for k, t in enumerate(choice)]))
    return ScoringPlan(units, [[len(c) for c in item.choice_ids] for item in encoded])


# ----------------------------------------------------------------- the HF scorer

def lm_logits(model, hidden: torch.Tensor, token_ids: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The causal-LM head on selected hidden states [N, hidden] -> [N, vocab] (float32),
    or [N, len(token_ids)] for those vocabulary rows only (the same values, without
    the full-vocabulary matmul)."""
    head = model.get_output_embeddings()
    if token_ids is None:
        logits = head(hidden).float()
    else:
        bias = None if head.bias is None else head.bias[token_ids]
        logits = torch.nn.functional.linear(hidden, head.weight[token_ids], bias).float()
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@dataclass(frozen=True)
class _Run:
    ids: list[int]  # trimmed to the last scored position
    entries: list[tuple[int, int, int, int]]  # (position, target, item, choice)


def _hf_runs(plan: ScoringPlan) -> list[_Run]:
    """The plan's units as HF sequences: an item's NEXT entries ride in its first
    FORCED unit (same query positions); each sequence ends at its last scored
    position (the final choice token is a target, never an input). Longest first,
    so a batch carries little padding."""
    forced_of: dict[int, int] = {}
    for n, unit in enumerate(plan.units):
        if unit.kind == FORCED:
            forced_of.setdefault(unit.item, n)
    runs: dict[int, list] = {}
    for n, unit in enumerate(plan.units):
        host = forced_of.get(unit.item, n) if unit.kind == NEXT else n
        runs.setdefault(host, []).extend((p, t, unit.item, j) for p, t, j in unit.entries)
    out = []
    for host, entries in runs.items():
        last = max(e[0] for e in entries)
        out.append(_Run(plan.units[host].ids[:last + 1], entries))
    out.sort(key=lambda r: -len(r.ids))
    return out


def pad_right(seqs: Sequence[Sequence[int]], prefix_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, S] (pads = 0, masked) and attention_mask [B, L+S]."""
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[row, :prefix_len + len(s)] = 1
    return input_ids, mask


def _prefix_kv(model, past_key_values, prefix_ids) -> tuple[list[hf_cache.KV] | None, int]:
    """The prefix as per-layer batch-1 (key, value) [1, kv_heads, L, head_dim] (a
    sliding-window layer of an ICL prefix may hold only its last window - 1
    positions), or None; and L."""
    if past_key_values is not None and prefix_ids is not None:
        raise ValueError("give either past_key_values (an adapter) or prefix_ids (ICL "
                         "demonstrations), not both")
    device = model.device
    if past_key_values is not None:
        dtype = model.get_input_embeddings().weight.dtype
        kv = [(k.to(device, dtype), v.to(device, dtype)) for k, v in past_key_values]
        kv = [(k[None], v[None]) if k.dim() == 3 else (k, v) for k, v in kv]
        return kv, kv[0][0].shape[-2]
    if prefix_ids:
        ids = torch.tensor([list(prefix_ids)], device=device)  # [1, L]
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], len(ids[0])
    return None, 0


@torch.inference_mode()
def score_plan(model, plan: ScoringPlan, *, past_key_values=None,
               prefix_ids: Sequence[int] | None = None, batch_size: int = 16,
               progress: bool = False) -> list[list[Score]]:
    """Run a plan with an HF model; [item][choice] -> (sum of logprobs, tokens).

    past_key_values: per layer (key, value), each [kv_heads, L, head_dim] or
    [1, kv_heads, L, head_dim]; prefix_ids: ICL demonstration ids; or neither.
    """
    kv, prefix_len = _prefix_kv(model, past_key_values, prefix_ids)
    device = model.device
    runs = _hf_runs(plan)
    totals = [[0.0] * len(lengths) for lengths in plan.choice_lengths]
    for start in tqdm(range(0, len(runs), batch_size), desc="scoring (hf)",
                      disable=not progress):
        batch = runs[start:start + batch_size]
        input_ids, mask = pad_right([r.ids for r in batch], prefix_len)
        cache = None if kv is None else hf_cache.shared_prefix_cache(kv, model.config,
                                                                     len(batch), prefix_len)
        hidden = model.base_model(input_ids=input_ids.to(device),
                                  attention_mask=mask.to(device), past_key_values=cache,
                                  use_cache=cache is not None).last_hidden_state  # [B, S, H]
        rows = torch.tensor([b for b, run in enumerate(batch) for _ in run.entries])
        entries = [e for run in batch for e in run.entries]
        positions = torch.tensor([e[0] for e in entries])
        targets = torch.tensor([e[1] for e in entries])
        selected = hidden[rows.to(device), positions.to(device)]  # [N, H]: scored only
        logprobs = torch.log_softmax(lm_logits(model, selected), dim=-1)  # [N, vocab]
        token_lp = logprobs.gather(1, targets[:, None].to(device))[:, 0]  # [N]
        for (_, _, i, j), lp in zip(entries, token_lp.double().tolist()):
            totals[i][j] += lp
    return [[(totals[i][j], n) for j, n in enumerate(lengths)]
            for i, lengths in enumerate(plan.choice_lengths)]


def score_encoded_hf(model, encoded: Sequence[EncodedItem], *, past_key_values=None,
                     prefix_ids: Sequence[int] | None = None, batch_size: int = 16,
                     progress: bool = False) -> list[list[Score]]:
    """Scores of pre-tokenized items; see score_items_hf."""
    return score_plan(model, make_plan(encoded), past_key_values=past_key_values,
                      prefix_ids=prefix_ids, batch_size=batch_size, progress=progress)


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
        batch_size: sequences per forward pass.
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
    return {"acc": prediction_accuracy(predictions(scores), labels),
            "acc_norm": prediction_accuracy(predictions(scores, normalize=True), labels),
            "n": n}


def prediction_accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Share of the predicted choice indices that equal the labels."""
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


class Scorer(Protocol):
    """What evaluation needs of a scorer: the HF one here, the vLLM one in
    plugin/scoring.py. Both execute the same ScoringPlan."""

    engine: str

    def score(self, encoded: Sequence[EncodedItem] | ScoringPlan, *,
              prefix_ids: Sequence[int] | None = None,
              adapter: str | None = None) -> list[list[Score]]: ...

    def close(self) -> None:
        """Release the scorer's resources (an engine's processes); idempotent."""


class HFScorer:
    """score(encoded, prefix_ids=..., adapter=...) with an HF model; adapters by name."""

    engine = "hf"

    def close(self) -> None:
        return None

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
        plan = encoded if isinstance(encoded, ScoringPlan) else make_plan(encoded)
        return score_plan(self.model, plan, past_key_values=past, prefix_ids=prefix_ids,
                          batch_size=self.batch_size, progress=self.progress)
