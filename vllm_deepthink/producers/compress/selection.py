"""Query-aware selection of k of a prefix's L positions, without gradients.

Per layer and KV head, each source position scores the attention the calibration
queries' tokens give it (every valid query token, summed over the query heads of the
KV head's GQA group and over the queries). Every head of every layer keeps the same
number k of positions (the paged cache has one shape), position 0 (the attention sink)
always among them, in increasing order (positions.py: sliding-window semantics).
A sliding-window layer keeps only positions its first query token sees
(p > L - W); the sink is kept there only when it is one of them.

This is SnapKV's fixed-shape per-head selection with the task's own queries as the
observation window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from vllm_deepthink.format.hf_config import kv_geometry, layer_windows
from vllm_deepthink.producers.compress.batches import KV, batch_indices, forward_after_prefix

METHOD = "query-attention"
SINK = 0


class SelectionError(ValueError):
    """k positions cannot be selected; the message says why and what to change."""


def check_prefix_len(k: int, source_len: int) -> None:
    """k keeps the sink and at least one more position, and fewer than the source's L."""
    if type(k) is not int or not 2 <= k < source_len:
        raise SelectionError(
            f"`prefix_len` must be an integer in [2, {source_len - 1}]: the sink and at least "
            f"one more position, fewer than the source's {source_len}; found {k!r}")


@torch.no_grad()
def attention_scores(model, prefix: Sequence[KV], query_ids: Sequence[Sequence[int]], *,
                     batch_size: int = 16, progress: bool = True) -> list[torch.Tensor]:
    """Per layer [num_kv_heads, L] float64: the attention every valid query token gives
    each prefix position, summed over the queries and each KV head's query heads."""
    if not query_ids:
        raise SelectionError("selection needs at least one calibration query")
    num_layers, num_kv_heads, _ = kv_geometry(model.config)
    prefix_len = prefix[0][0].shape[-2]
    totals = [torch.zeros(num_kv_heads, prefix_len, dtype=torch.float64)
              for _ in range(num_layers)]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation returning weights
    try:
        batches = list(batch_indices(len(query_ids), batch_size))
        for rows in tqdm(batches, desc="selection: attention", unit="batch",
                         disable=not progress, leave=False):
            out = forward_after_prefix(model, prefix, [query_ids[i] for i in rows],
                                       output_attentions=True)
            weights = out.valid[:, None, :, None].to(torch.float64)  # [B, 1, S, 1]
            for layer, attn in enumerate(out.attentions):  # [B, heads, S, L+S]
                per_head = (attn[..., :prefix_len].double() * weights).sum(dim=(0, 2))
                # HF's repeat_kv: KV head i serves query heads i*g .. i*g+g-1.
                totals[layer] += per_head.view(num_kv_heads, -1, prefix_len).sum(dim=1).cpu()
    finally:
        model.set_attn_implementation(previous)
    return totals


def select_positions(scores: Sequence[torch.Tensor], k: int,
                     windows: Sequence[int | None] | None = None) -> torch.Tensor:
    """[num_layers, num_kv_heads, k] kept source positions, increasing along the last
    dim: each head's k best-scored positions with the sink always kept, among the
    positions a sliding-window layer's first query token sees (`windows`: per layer
    its window or None)."""
    windows = list(windows) if windows is not None else [None] * len(scores)
    kept = []
    for layer, (score, window) in enumerate(zip(scores, windows)):
        num_heads, prefix_len = score.shape
        check_prefix_len(k, prefix_len)
        s = score.double().clone()
        first = 0 if window is None else max(0, prefix_len - window + 1)
        if prefix_len - first < k:
            raise SelectionError(
                f"layer {layer} is a sliding-window layer (window {window}): the query sees "
                f"only the last {prefix_len - first} of the {prefix_len} source positions "
                f"there, fewer than prefix_len={k}. Use prefix_len <= {prefix_len - first}.")
        s[:, :first] = -torch.inf
        if first == SINK:
            s[:, SINK] = torch.inf
        top = torch.topk(s, k, dim=1).indices  # [heads, k]
        kept.append(torch.sort(top, dim=1).values)
    return torch.stack(kept)


def gather_positions(tensors: Sequence[torch.Tensor], positions: torch.Tensor
                     ) -> list[torch.Tensor]:
    """Per layer [num_kv_heads, L, head_dim] -> [num_kv_heads, k, head_dim] at
    `positions` [num_layers, num_kv_heads, k]."""
    out = []
    for t, pos in zip(tensors, positions):
        index = pos.to(t.device)[:, :, None].expand(-1, -1, t.shape[-1])
        out.append(torch.gather(t, 1, index).contiguous())
    return out


def select(model, prefix: Sequence[KV], query_ids: Sequence[Sequence[int]], k: int, *,
           batch_size: int = 16, progress: bool = True,
           scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Kept positions [num_layers, num_kv_heads, k] of a prefix for these queries;
    `scores`: their attention_scores when already computed (they do not depend on k)."""
    prefix_len = prefix[0][0].shape[-2]
    check_prefix_len(k, prefix_len)
    if scores is None:
        scores = attention_scores(model, prefix, query_ids, batch_size=batch_size,
                                  progress=progress)
    return select_positions(scores, k, layer_windows(model.config))
