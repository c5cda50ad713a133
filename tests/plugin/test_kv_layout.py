"""Pure tensor functions of kv_layout.py, on CPU, without an engine."""

from __future__ import annotations

import pytest
import torch

from vllm_deepthink.plugin.connector import kv_layout


def naive_slots(block_ids, block_size, start, end):
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@pytest.mark.parametrize("start,end", [(0, 32), (0, 45), (32, 45), (40, 100), (7, 8)])
def test_slot_mapping_matches_block_table(start, end):
    block_ids = [9, 3, 17, 4]
    slots = kv_layout.slot_mapping(block_ids, 32, start, end)
    assert slots.dtype == torch.int64
    assert slots.tolist() == naive_slots(block_ids, 32, start, end)


def test_slot_mapping_with_kernel_blocks_keeps_slot_numbers():
    # A backend splitting each 64-token block into two 32-token kernel blocks
    # (kernel block b * 2 + j) addresses the same slots.
    block_ids = [5, 2]
    slots = kv_layout.slot_mapping(block_ids, 64, 10, 100)
    kernel_ids = [b * 2 + j for b in block_ids for j in range(2)]
    assert slots.tolist() == naive_slots(kernel_ids, 32, 10, 100)


def test_slot_mapping_rejects_short_table_and_bad_ranges():
    with pytest.raises(ValueError, match="need 2 blocks"):
        kv_layout.slot_mapping([1], 32, 0, 33)
    with pytest.raises(ValueError, match="start < end"):
        kv_layout.slot_mapping([1], 32, 5, 5)
    with pytest.raises(ValueError, match="block_size"):
        kv_layout.slot_mapping([1], 0, 0, 1)


@pytest.mark.parametrize("heads,tp,expected", [
    (4, 1, [(0, 4)]),
    (4, 2, [(0, 2), (2, 4)]),
    (2, 2, [(0, 1), (1, 2)]),
    # tp > heads: each head replicated on tp / heads consecutive ranks.
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),
    (1, 2, [(0, 1), (0, 1)]),
])
def test_kv_head_range(heads, tp, expected):
    assert [kv_layout.kv_head_range(heads, tp, r) for r in range(tp)] == expected


def test_kv_head_range_rejects_uneven_splits():
    with pytest.raises(ValueError, match="evenly"):
        kv_layout.kv_head_range(3, 2, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        kv_layout.kv_head_range(2, 3, 0)
    with pytest.raises(ValueError, match="outside"):
        kv_layout.kv_head_range(2, 2, 2)


def test_rank_heads_slices_heads_and_ranks_cover_all_heads():
    kv = torch.arange(4 * 5 * 3, dtype=torch.float32).reshape(4, 5, 3)   # [H, L, D]
    parts = [kv_layout.rank_heads(kv, 2, r) for r in range(2)]
    assert [tuple(p.shape) for p in parts] == [(2, 5, 3), (2, 5, 3)]
    assert torch.equal(torch.cat(parts), kv)
    replicated = [kv_layout.rank_heads(kv[:1], 2, r) for r in range(2)]
    assert all(torch.equal(p, kv[:1]) for p in replicated)


def test_token_major_layout():
    kv = torch.randn(2, 10, 4)                                           # [H, L, D]
    out = kv_layout.token_major(kv, 3, 7)
    assert tuple(out.shape) == (4, 2, 4) and out.is_contiguous()
    assert torch.equal(out[1, 0], kv[0, 4]) and torch.equal(out[2, 1], kv[1, 5])
    with pytest.raises(ValueError, match="outside"):
        kv_layout.token_major(kv, 5, 11)


def test_to_cache_dtype_converts_and_refuses():
    kv = torch.randn(2, 3, 4)
    assert kv_layout.to_cache_dtype(kv, torch.bfloat16, "a").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="overflow"):
        kv_layout.to_cache_dtype(kv * 1e6, torch.float16, "a")
    with pytest.raises(ValueError, match="kv_cache_dtype='auto'"):
        kv_layout.to_cache_dtype(kv, torch.float8_e4m3fn, "a")


def test_layer_index_and_matching():
    llama = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    gpt2 = [f"transformer.h.{i}.attn.attn" for i in range(2)]
    assert kv_layout.match_layers(llama, 3) == {n: i for i, n in enumerate(llama)}
    assert kv_layout.match_layers(gpt2, 2) == {n: i for i, n in enumerate(gpt2)}
    # EAGLE-style draft layers are numbered after the target's and are left out.
    draft = ["model.layers.3.self_attn.attn"]
    assert kv_layout.match_layers(llama + draft, 3) == {n: i for i, n in enumerate(llama)}
    with pytest.raises(ValueError, match="missing layer numbers \\[2\\]"):
        kv_layout.match_layers(llama[:2], 3)
    with pytest.raises(ValueError, match="ambiguous"):
        kv_layout.match_layers(llama + ["draft.layers.0.attn"], 3)
    with pytest.raises(ValueError, match="exactly one layer number"):
        kv_layout.layer_index("model.layers.0.experts.1.attn")
