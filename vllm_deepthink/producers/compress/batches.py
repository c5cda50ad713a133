"""Batches of queries run after a per-layer K/V prefix (the forward every step of the
compressor shares: attention scores, teacher targets, the distilled student).

Queries are token ids without special tokens (docs/DESIGN.md), right-padded, at
positions L.. behind the prefix, which is read without a copy
(hf_cache.shared_prefix_cache) and may carry gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vllm_deepthink.format import hf_cache
from vllm_deepthink.tasks import scoring

KV = tuple[torch.Tensor, torch.Tensor]


def batch_indices(count: int, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, count, batch_size):
        yield list(range(start, min(count, start + batch_size)))


@dataclass
class PrefixForward:
    """One batch after the prefix: hidden [B, S, hidden], valid [B, S] (False on pads),
    attentions per layer [B, heads, S, L+S] (only when asked for)."""

    hidden: torch.Tensor
    valid: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None

    def last_rows(self) -> torch.Tensor:
        """[B] index of each query's last position among the valid rows (row-major)."""
        lengths = self.valid.sum(dim=1)
        return torch.cumsum(lengths, dim=0) - 1

    def logits(self, model) -> torch.Tensor:
        """[N, vocab] float32 logits at the N valid positions (row-major)."""
        return scoring.lm_logits(model, self.hidden[self.valid])


def forward_after_prefix(model, prefix: Sequence[KV], query_ids: Sequence[Sequence[int]],
                         output_attentions: bool = False) -> PrefixForward:
    """Run `query_ids` (a batch) after `prefix`, per layer (key, value) each
    [num_kv_heads, L, head_dim] (or [1, ...]); the queries start at position L."""
    device = model.device
    dtype = model.get_input_embeddings().weight.dtype
    kv = [(k.to(device, dtype), v.to(device, dtype)) for k, v in prefix]
    kv = [(k[None], v[None]) if k.dim() == 3 else (k, v) for k, v in kv]
    prefix_len = kv[0][0].shape[-2]
    input_ids, mask = scoring.pad_right(query_ids, prefix_len)
    cache = hf_cache.shared_prefix_cache(kv, model.config, len(query_ids), prefix_len)
    out = model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           past_key_values=cache, use_cache=True,
                           output_attentions=output_attentions)
    return PrefixForward(hidden=out.last_hidden_state,
                         valid=mask[:, prefix_len:].bool().to(device),
                         attentions=out.attentions if output_attentions else None)
