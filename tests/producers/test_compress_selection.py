"""Compression, no gradients: the re-rotation identity (tiny Llama, tiny Gemma-3-style
local/global RoPE) and query-aware selection (sink, k per head and layer, windows)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import load_tiny
from tests.producers.test_builder import tiny_gemma3
from vllm_deepthink.producers.compress import positions, selection
from vllm_deepthink.producers.compress.batches import forward_after_prefix

DEMOS = ("Review: a charming film\nSentiment: positive\n\n"
         "Review: contains no wit , only labored gags\nSentiment: negative\n\n")
QUERIES = ["Review: the quick brown fox\nSentiment:", "Question: who wrote Hamlet ?\nType:",
           "Review: a lazy dog\nSentiment:"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_tiny("llama", tiny_llama_dir)


def source_prefix(model, ids):
    """Per layer (key, value) [kv_heads, L, head_dim] of a plain forward of `ids`."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    return [(layer.keys[0].clone(), layer.values[0].clone())
            for layer in out.past_key_values.layers]


def run_eager(model, prefix, query_ids, attention_mask=None):
    """(logits [S, vocab], attentions per layer [heads, S, prefix+S]) of one query."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            if attention_mask is None:
                out = forward_after_prefix(model, prefix, [query_ids], output_attentions=True)
                return out.logits(model), [a[0] for a in out.attentions]
            from vllm_deepthink.format import hf_cache

            cache = hf_cache.cache_from_kv([(k[None], v[None]) for k, v in prefix],
                                           model.config)
            out = model(torch.tensor([query_ids]), attention_mask=attention_mask,
                        past_key_values=cache, use_cache=True, output_attentions=True)
            return out.logits[0].float(), [a[0] for a in out.attentions]
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_rotated_kept_keys_give_the_source_scores_with_the_query_at_k(kind, llama):
    """Keeping positions P of L and rotating their keys by -(L-k): the query at k.. gets
    exactly the attention scores (and logits) of the query at L.. over the source prefix
    with every other position masked out."""
    model, tokenizer = llama if kind == "llama" else (tiny_gemma3(sliding_window=64), llama[1])
    demo_ids = tokenizer(DEMOS * 2, add_special_tokens=True)["input_ids"][:40]
    prefix = source_prefix(model, demo_ids)
    L = len(demo_ids)
    kept = [0, 3, 4, 9, 17, 25, 31, 39]
    k = len(kept)
    num_layers, num_heads = len(prefix), prefix[0][0].shape[0]
    pos = torch.tensor(kept).expand(num_layers, num_heads, k)
    keys = selection.gather_positions([p[0] for p in prefix], pos)
    values = selection.gather_positions([p[1] for p in prefix], pos)
    shifted = positions.shift_keys(model, keys, L)
    query = tokenizer(QUERIES[0], add_special_tokens=False)["input_ids"]

    mask = torch.zeros(1, L + len(query), dtype=torch.long)
    mask[0, kept] = 1
    mask[0, L:] = 1
    ref_logits, ref_attn = run_eager(model, prefix, query, attention_mask=mask)
    logits, attn = run_eager(model, list(zip(shifted, values)), query)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0), \
        (logits - ref_logits).abs().max()
    for layer, (a, r) in enumerate(zip(attn, ref_attn)):
        ref = torch.cat([r[..., kept], r[..., L:]], dim=-1)  # [heads, S, k + S]
        assert torch.allclose(a, ref, atol=1e-5, rtol=0), (layer, (a - ref).abs().max())
    # Without the rotation the query would sit L-k positions closer: not the same scores.
    unrotated, _ = run_eager(model, list(zip(keys, values)), query)
    assert (unrotated - ref_logits).abs().max() > 1e-3


def test_gpt2_learned_positions_are_refused(tmp_path):
    model, _ = load_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(positions.PositionsError, match="learned absolute positions"):
        positions.check_movable(model.config)


def test_select_positions_keeps_the_sink_and_k_per_head():
    scores = [torch.tensor([[0.0, 5, 1, 4, 3, 2], [0.0, 1, 2, 3, 4, 5]]),
              torch.tensor([[9.0, 1, 2, 1, 8, 1], [0.0, 0, 7, 6, 0, 0]])]
    kept = selection.select_positions(scores, 3)
    # The sink is kept even where it scores lowest; the other k-1 are the best scored.
    assert kept.tolist() == [[[0, 1, 3], [0, 4, 5]], [[0, 2, 4], [0, 2, 3]]]


def test_sliding_window_layers_keep_only_what_the_query_sees():
    scores = [torch.arange(10.0).flip(0).expand(2, 10), torch.arange(10.0).flip(0).expand(2, 10)]
    kept = selection.select_positions(scores, 3, windows=[None, 6])
    assert kept[0].tolist() == [[0, 1, 2]] * 2           # full layer: sink + best scores
    assert kept[1].tolist() == [[5, 6, 7]] * 2           # window 6 at L=10: sees 5..9 only
    with pytest.raises(selection.SelectionError, match="sliding-window layer"):
        selection.select_positions(scores, 6, windows=[None, 6])


@pytest.mark.parametrize("k", [1, 40, 41])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(selection.SelectionError, match=r"`prefix_len` must be an integer in \[2, 39\]"):
        selection.select_positions([torch.rand(2, 40)], k)


def test_select_scores_every_layer_and_head_from_the_queries(llama):
    model, tokenizer = llama
    demo_ids = tokenizer(DEMOS, add_special_tokens=True)["input_ids"]
    prefix = source_prefix(model, demo_ids)
    query_ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUERIES]
    scores = selection.attention_scores(model, prefix, query_ids, batch_size=2,
                                        progress=False)
    assert len(scores) == 3 and scores[0].shape == (2, len(demo_ids))
    # Each query token's attention sums to 1 over prefix + query; 2 query heads per KV head.
    tokens = sum(len(q) for q in query_ids)
    total = sum(s.sum() for s in scores)
    assert 0 < total < 3 * 4 * tokens
    assert model.config._attn_implementation == "sdpa"  # restored after the eager pass
    kept = selection.select(model, prefix, query_ids, 7, batch_size=2, progress=False)
    assert kept.shape == (3, 2, 7)
    assert (kept[..., 0] == 0).all() and (kept.diff(dim=-1) > 0).all()
    # The non-sink positions are each head's best-scored ones.
    for layer in range(3):
        for head in range(2):
            best = set(torch.topk(scores[layer][head][1:], 6).indices.add(1).tolist())
            assert set(kept[layer, head, 1:].tolist()) == best
