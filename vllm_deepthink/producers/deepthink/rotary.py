"""Inverse rotary embedding: rotate cached keys back by a fixed number of positions.

In `--position-mode aligned` the demos' new keys, computed at positions L..2L-1,
are rotated back by L so that they carry the positions 0..L-1 the adapter is
served at. RoPE rotates each (x_i, x_{i+d/2}) pair of a key by angle p*theta_i
and scales cos/sin by the rope type's attention factor s:

    k_p = s * R(p) k        (R(p) a rotation, apply_rotary_pos_emb's rotate_half layout)

R(-L) is linear, so R(-L) k_{p+L} = s * R(p) k = k_p. The rotation uses the
model's own rotary module (per layer type, e.g. Gemma 3's local and global
bases) with the attention factor divided out, so it inverts exactly what the
model applied.
"""

from __future__ import annotations

import inspect

import torch

from vllm_deepthink.format.hf_config import text_config

# Model types whose attention applies HF's `apply_rotary_pos_emb` (rotate_half
# layout, rotary dims first) with cos/sin from `model.model.rotary_emb`.
ROTATE_HALF_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
})

# Rope types whose frequencies depend on the sequence length: positions p and
# p+L may be rotated with different frequencies, so no fixed inverse exists.
_LENGTH_DEPENDENT_ROPE_TYPES = frozenset({"dynamic", "longrope"})


class RotaryError(ValueError):
    """The model's position encoding cannot be inverted by this module."""


def _rope_types(config) -> set[str]:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and all(
            isinstance(v, dict) or v is None for v in params.values()):
        return {v.get("rope_type", "default") for v in params.values() if v}
    return {params.get("rope_type", "default")} if isinstance(params, dict) else {"default"}


def check_invertible(config, needed_by: str = "`position_mode` aligned",
                     fix: str = "Use `position_mode` published for this model.") -> None:
    """Raise RotaryError unless keys of this model can be rotated back; the message
    names what needs the rotation (`needed_by`) and ends with `fix`."""
    text = text_config(config)
    model_type = text.model_type
    if model_type not in ROTATE_HALF_MODEL_TYPES:
        raise RotaryError(
            f"{needed_by} needs a rotary-position (RoPE) model of a known layout "
            f"({sorted(ROTATE_HALF_MODEL_TYPES)}); found model_type {model_type!r}"
            + (" which uses learned absolute positions" if model_type in ("gpt2", "opt") else "")
            + f". {fix}")
    length_dependent = _rope_types(text) & _LENGTH_DEPENDENT_ROPE_TYPES
    if length_dependent:
        raise RotaryError(
            f"{needed_by} cannot invert rope type {sorted(length_dependent)}: its "
            f"frequencies change with the sequence length. {fix}")


def rotary_module(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise RotaryError(
            f"{type(model).__name__} has no rotary embedding module (model.model.rotary_emb); "
            f"`position_mode` aligned needs a RoPE model. Use `position_mode` published.")
    return rotary


def layer_rotations(model, shift: int, total_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, (cos, sin) of the rotation by `shift` positions, each
    [rotary_dim], without the attention factor.

    The model's rotary module is evaluated at positions 0..total_length-1 (the
    positions of the forward pass whose keys are rotated back), so rope types
    that look at the largest position see the same one.
    """
    check_invertible(model.config)
    text = text_config(model.config)
    rotary = rotary_module(model)
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = list(getattr(text, "layer_types", None) or [None] * text.num_hidden_layers)
    position_ids = torch.arange(total_length, device=model.device).unsqueeze(0)  # [1, T]
    probe = torch.zeros(1, dtype=torch.float32, device=position_ids.device)
    per_type: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_type in sorted(set(layer_types), key=str):
        if takes_layer_type:
            cos, sin = rotary(probe, position_ids, layer_type=layer_type)  # [1, T, rot_dim]
            scaling = getattr(rotary, f"{layer_type}_attention_scaling")
        else:
            cos, sin = rotary(probe, position_ids)
            scaling = rotary.attention_scaling
        per_type[layer_type] = (cos[0, shift].float() / scaling, sin[0, shift].float() / scaling)
    return [per_type[t] for t in layer_types]


def rotate_back(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(-shift) applied to keys [..., head_dim] given cos/sin [rotary_dim] of the shift.

    Rotary dims come first; the remaining (pass-through) dims are left as they are.
    """
    rot_dim = cos.shape[-1]
    k_rot, k_pass = key[..., :rot_dim].float(), key[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = torch.cat((-k_rot[..., half:], k_rot[..., :half]), dim=-1)
    # R(theta)k = k*cos + rotate_half(k)*sin, so R(-theta)k = k*cos - rotate_half(k)*sin.
    back = (k_rot * cos - rotated_half * sin).to(key.dtype)
    return torch.cat((back, k_pass), dim=-1) if k_pass.shape[-1] else back


def rotate_keys_back(model, keys: list[torch.Tensor], shift: int,
                     rotations: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                     ) -> list[torch.Tensor]:
    """Each layer's keys [..., L, head_dim] rotated back by `shift` positions."""
    if rotations is None:
        rotations = layer_rotations(model, shift, total_length=shift + keys[0].shape[-2])
    if len(rotations) != len(keys):
        raise RotaryError(f"{len(keys)} layers of keys but {len(rotations)} rotary layers")
    return [rotate_back(k, cos, sin) for k, (cos, sin) in zip(keys, rotations)]
