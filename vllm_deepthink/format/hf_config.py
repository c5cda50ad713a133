"""Facts read off an HF model config, each in one place (no model is instantiated).

Multimodal configs (e.g. Gemma 3) nest the language model's settings in a text
config; every reader here looks there.
"""

from __future__ import annotations

from typing import Any

# Config keys that bound the positions a model can attend over, by family.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def text_config(config: Any) -> Any:
    """The text model's config of an HF config (the config itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of an HF config's text model: the shape of
    its K/V cache."""
    text = text_config(config)
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    return int(text.num_hidden_layers), int(num_kv_heads), int(head_dim)


def max_positions(config: Any) -> int | None:
    """The number of positions the text model supports, or None when the config
    does not say."""
    text = text_config(config)
    for name in _MAX_POSITION_KEYS:
        value = getattr(text, name, None)
        if value:
            return int(value)
    return None


def sliding_window(config: Any) -> int | None:
    """The sliding-window size of the text model's local layers, or None when no
    layer uses one."""
    text = text_config(config)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window) if window else None


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer, its sliding-window size, or None for a full-attention layer
    (Gemma 3 mixes both through `layer_types`; Mistral-style configs slide everywhere)."""
    text = text_config(config)
    window = sliding_window(config)
    layer_types = getattr(text, "layer_types", None)
    if window is None:
        return [None] * int(text.num_hidden_layers)
    if layer_types is None:
        return [window] * int(text.num_hidden_layers)
    return [window if t == "sliding_attention" else None for t in layer_types]
