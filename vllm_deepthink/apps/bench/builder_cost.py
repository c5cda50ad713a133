"""The builder's cost: seconds per Deep-Thinking iteration vs one plain forward over 2L tokens.

Iteration t >= 2 runs the L demo tokens with the current L-position K/V as
past_key_values (attention over 2L positions) and updates the K/V, so its cost
should be close to (and below) a plain forward pass over 2L tokens.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


@torch.no_grad()
def measure_builder_cost(model, demo_ids: list[int], iterations: int = 4,
                         repetitions: int = 3) -> dict[str, Any]:
    from vllm_deepthink.producers.deepthink.iteration import deep_thinking_steps

    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 to time a Deep-Thinking step, found {iterations}")
    per_iteration: list[float] = []
    first_forward: list[float] = []
    for _ in range(repetitions):
        last = time.perf_counter()
        for iteration, _, _ in deep_thinking_steps(model, demo_ids, iterations=iterations):
            now = time.perf_counter()
            (first_forward if iteration == 1 else per_iteration).append(now - last)
            last = now
    prefix_len = len(demo_ids)
    doubled = torch.tensor([(demo_ids * 2)[:2 * prefix_len]])         # [1, 2L]
    model(input_ids=doubled, use_cache=True)                            # warm-up
    plain_2l = []
    for _ in range(repetitions):
        start = time.perf_counter()
        model(input_ids=doubled, use_cache=True)
        plain_2l.append(time.perf_counter() - start)
    iteration_s = statistics.median(per_iteration)
    forward_2l_s = statistics.median(plain_2l)
    return {
        "prefix_len": prefix_len,
        "iterations_timed": iterations,
        "repetitions": repetitions,
        "iteration_s": iteration_s,
        "iteration_s_all": per_iteration,
        "first_iteration_s": statistics.median(first_forward),
        "plain_forward_2l_s": forward_2l_s,
        "plain_forward_2l_s_all": plain_2l,
        "iteration_over_forward_2l": iteration_s / forward_2l_s,
        "definition": ("iteration_s: median seconds of one Deep-Thinking step t >= 2 "
                       "(forward of the L demos after L past positions + momentum update), "
                       "from vllm_deepthink.producers.deepthink.iteration.deep_thinking_steps; "
                       "plain_forward_2l_s: median seconds of one HF forward over 2L tokens (no past)"),
    }
