"""Deep-Thinking (iterative forward tuning) with HF transformers; never imports vLLM.

Step 1 is a plain forward pass of the demonstrations (= ordinary ICL K/V). Each
later step runs the demonstrations again with the current K/V as
past_key_values (so they sit at positions L..2L-1, attend to the prefix and
causally to themselves), takes their new K/V (the last L cache positions of
every layer) and lets a meta-optimizer move the current K/V toward them, as
AlibabaResearch/DAMO-ConvAI deep-thinking/models/meta_optimizer.py does.

Here: the meta-optimizers, the checks a build runs before any forward pass, and
deep_thinking_steps (the iterates).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vllm_deepthink.format import hf_cache
from vllm_deepthink.format.hf_config import kv_geometry, max_positions, sliding_window, text_config
from vllm_deepthink.producers.deepthink import rotary, search
from vllm_deepthink.producers.deepthink.errors import BuildError

OPTIMIZERS = ("momentum", "ema")
POSITION_MODES = ("published", "aligned")

# Model types whose every decoder layer keeps a plain [batch, kv_heads, L, head_dim]
# K/V cache in transformers (no linear attention, latent attention or shared KV).
SUPPORTED_MODEL_TYPES = rotary.ROTATE_HALF_MODEL_TYPES | {"gpt2", "opt"}


# ----------------------------------------------------------------- meta-optimizers

class MomentumOptimizer:
    """g = new - old; m = g on the first update, else g + beta * m; x = old + step_size * m."""

    def __init__(self, step_size: float = search.DEFAULT_STEP_SIZE,
                 beta: float = search.DEFAULT_BETA):
        self.step_size, self.beta = step_size, beta
        self.momentum: list[torch.Tensor] | None = None

    def __call__(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        grads = [n - o for o, n in zip(old, new)]
        if self.momentum is None:
            self.momentum = grads
        else:
            self.momentum = [g + self.beta * m for g, m in zip(grads, self.momentum)]
        return [o + self.step_size * m for o, m in zip(old, self.momentum)]


class EmaOptimizer:
    """x = eta * new + (1 - eta) * old."""

    def __init__(self, eta: float = search.DEFAULT_EMA_ETA):
        self.eta = eta

    def __call__(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        return [self.eta * n + (1.0 - self.eta) * o for o, n in zip(old, new)]


def optimizer_params(optimizer: str, step_size: float = search.DEFAULT_STEP_SIZE,
                     beta: float = search.DEFAULT_BETA, eta: float = search.DEFAULT_EMA_ETA
                     ) -> dict[str, float]:
    if optimizer == "momentum":
        return {"step_size": float(step_size), "beta": float(beta)}
    if optimizer == "ema":
        return {"eta": float(eta)}
    raise BuildError(f"optimizer must be one of {OPTIMIZERS}, found {optimizer!r}")


def _make_optimizer(optimizer: str, params: dict[str, float]):
    return MomentumOptimizer(**params) if optimizer == "momentum" else EmaOptimizer(**params)


# ----------------------------------------------------------------- checks

def max_prefix_len(config) -> int | None:
    """The longest demonstration prefix L the builder accepts for this model: 2L must
    fit its positions and its sliding window (None: no bound in the config)."""
    bounds = [b for b in (max_positions(config), sliding_window(config)) if b is not None]
    return min(bounds) // 2 if bounds else None


def check_build_supported(config, prefix_len: int, position_mode: str) -> None:
    """Everything that can be checked before any forward pass; raises BuildError."""
    text = text_config(config)
    if position_mode not in POSITION_MODES:
        raise BuildError(f"position_mode must be one of {POSITION_MODES}, found {position_mode!r}")
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(
            f"model_type {text.model_type!r} ({getattr(config, 'architectures', None)}) is not "
            f"supported by the Deep-Thinking builder; supported: {sorted(SUPPORTED_MODEL_TYPES)}. "
            f"They keep one plain [kv_heads, L, head_dim] key/value cache per layer.")
    if position_mode == "aligned":
        try:
            rotary.check_invertible(config)
        except rotary.RotaryError as exc:
            raise BuildError(str(exc)) from None
    if prefix_len < 1:
        raise BuildError("the demonstrations tokenize to 0 tokens; give a non-empty demo text")
    positions, window = max_positions(config), sliding_window(config)
    _check_twice_prefix_fits(
        prefix_len, positions, f"Deep-Thinking runs them at positions {prefix_len}.."
        f"{2 * prefix_len - 1}", f"the model's {positions} positions")
    _check_twice_prefix_fits(
        prefix_len, window, f"in the later steps the last demo token (position "
        f"{2 * prefix_len - 1}) must still see the whole prefix",
        f"the sliding window of {window} tokens")


def _check_twice_prefix_fits(prefix_len: int, limit: int | None, why: str, what: str) -> None:
    """Refuse demonstrations whose 2*L exceeds `limit` tokens (None: no limit)."""
    if limit is not None and 2 * prefix_len > limit:
        raise BuildError(
            f"demonstrations are {prefix_len} tokens; {why}, so 2*L = {2 * prefix_len} must "
            f"be <= {what}. Use fewer or shorter demonstrations (at most {limit // 2} tokens).")


# ----------------------------------------------------------------- the iteration

def _check_kv_shapes(model, kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: int) -> None:
    num_layers, num_kv_heads, head_dim = kv_geometry(model.config)
    expected = (1, num_kv_heads, prefix_len, head_dim)
    if len(kv) != num_layers:
        raise BuildError(f"the model returned {len(kv)} cache layers, expected "
                         f"{num_layers}; this architecture is not supported")
    for i, (k, v) in enumerate(kv):
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise BuildError(
                f"layer {i}: cache K/V shapes {tuple(k.shape)}/{tuple(v.shape)}, expected "
                f"[1, num_kv_heads, L, head_dim] = {list(expected)}; this architecture's "
                f"cache is not supported")


@torch.no_grad()
def _forward_demos(model, demo_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]] | None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of the demos [1, L] after `past` (None for step 1), each [1, kv_heads, L, head_dim]."""
    prefix_len = demo_ids.shape[1]
    past_len = 0 if past is None else past[0][0].shape[-2]
    cache = None if past is None else hf_cache.cache_from_kv(past, model.config)
    mask = torch.ones(1, past_len + prefix_len, dtype=torch.long, device=demo_ids.device)
    out = model(input_ids=demo_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return hf_cache.last_positions(out.past_key_values, prefix_len)


def deep_thinking_steps(model, demo_ids: Sequence[int] | torch.Tensor, *, iterations: int,
                        optimizer: str = "momentum", step_size: float = search.DEFAULT_STEP_SIZE,
                        beta: float = search.DEFAULT_BETA, eta: float = search.DEFAULT_EMA_ETA,
                        position_mode: str = "published"
                        ) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield (iteration, keys, values) for iteration = 1..iterations.

    keys/values: per layer [num_kv_heads, L, head_dim], the K/V after that iteration
    (iteration 1 = plain forward of the demos). Only the current K/V and the
    optimizer state are kept; yielded tensors are never modified afterwards.
    """
    if iterations < 1:
        raise BuildError(f"iterations must be >= 1, found {iterations}")
    ids = torch.as_tensor(demo_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    prefix_len = ids.shape[1]
    check_build_supported(model.config, prefix_len, position_mode)
    params = optimizer_params(optimizer, step_size, beta, eta)
    optim_k, optim_v = _make_optimizer(optimizer, params), _make_optimizer(optimizer, params)
    rotations = (rotary.layer_rotations(model, prefix_len, 2 * prefix_len)
                 if position_mode == "aligned" else None)

    # The optimizer works on float32 copies (no-ops for a float32 model): with 16-bit
    # K/V, `old + 0.01 * m` would mostly round back to `old`.
    def master(tensors):
        return [t.float() for t in tensors]

    def model_dtype(tensors):
        return [t.to(dtype) for t in tensors]

    was_training = model.training
    model.eval()  # dropout off: the K/V must be deterministic
    try:
        kv = _forward_demos(model, ids, None)
        _check_kv_shapes(model, kv, prefix_len)
        dtype = kv[0][0].dtype
        keys, values = master(k for k, _ in kv), master(v for _, v in kv)
        yield 1, [k[0] for k in model_dtype(keys)], [v[0] for v in model_dtype(values)]
        for iteration in range(2, iterations + 1):
            past = list(zip(model_dtype(keys), model_dtype(values)))
            new = _forward_demos(model, ids, past)  # the demos at positions L..2L-1
            new_keys, new_values = master(k for k, _ in new), master(v for _, v in new)
            if rotations is not None:
                new_keys = rotary.rotate_keys_back(model, new_keys, prefix_len, rotations)
            keys, values = optim_k(keys, new_keys), optim_v(values, new_values)
            yield iteration, [k[0] for k in model_dtype(keys)], [v[0] for v in model_dtype(values)]
    finally:
        model.train(was_training)
