"""Positions of a compressed prefix: kept keys rotated by -(L-k) with the model's own RoPE.

A source key at position p is stored post-RoPE, k_p = s * R(p) k. The query of a
compressed prefix starts at position k instead of L, so every kept key is rotated by
-(L-k) (rotary.rotate_keys_back, per layer type: Gemma 3's local and global bases):
it then carries position p - (L-k), and the query/key distance (k+j) - (p-(L-k)) =
L+j-p is the original one. Attention scores are exactly those of the query at L
(tested to 1e-5); only which positions exist changes.

Sliding-window layers (selection.py): a query token at L+j of the source sees
positions p > L+j-W. The kept positions stay in increasing order in the k slots, so
slot i of position p has slot distance k+j-i <= L+j-p: every key the source's window
showed a query token stays visible to it. A key stays visible longer than in the
source when L + query length > W (the compressed window counts k slots, not L
positions); for W >= L + query length nothing changes.

Learned absolute positions (GPT-2, OPT) add the query's position embedding at its
input: moving the query from L to k changes its own embeddings, which no operation
on the prefix undoes. They are refused (not measured yet).
"""

from __future__ import annotations

import torch

from vllm_deepthink.producers.deepthink import rotary


class PositionsError(ValueError):
    """The model's positions cannot be moved from L to k exactly."""


def check_movable(config) -> None:
    """Raise PositionsError unless a RoPE layout this module can rotate (rotary.py)."""
    try:
        rotary.check_invertible(
            config, needed_by="compress (the kept keys move from the source's L positions to k)",
            fix="Learned absolute positions (GPT-2, OPT) are not supported by compress yet: "
                "the query would move from position L to k and change its own position "
                "embeddings. Compress adapters of a RoPE model (Llama, Qwen, Gemma, ...).")
    except rotary.RotaryError as exc:
        raise PositionsError(str(exc)) from None


def shift_keys(model, keys: list[torch.Tensor], source_len: int) -> list[torch.Tensor]:
    """Kept keys per layer [..., k, head_dim] rotated by -(L - k), L = source_len: a
    key of source position p then carries position p - (L - k)."""
    check_movable(model.config)
    shift = source_len - keys[0].shape[-2]
    rotations = rotary.layer_rotations(model, shift, total_length=source_len)
    return rotary.rotate_keys_back(model, keys, shift, rotations)
