"""The update-strength grid of `vllm-deepthink build --search` (selected on dev only).

Candidates (in this order; ties on dev go to the earlier one, so the published
default wins a tie):

    momentum  step_size in {0.01, 0.03} x beta in {0.9, 0}   (v1 code: 0.01 / 0.9)
    ema       eta in {0.05, 0.1, 0.2}                          (ACL'24 gate)

each in position mode "published" and, for models whose rotary embedding can be
undone (rotary.check_invertible), "aligned": 7 or 14 candidates. Iteration 1 is the
same plain forward for all of them (ICL), scored once.

Momentum with beta 0 is exactly ema with eta = step_size (m = g, kv = old + s * (new -
old)), so the grid is two momentum-0.9 lines (step 0.01, 0.03) and one ema line over
eta {0.01, 0.03, 0.05, 0.1, 0.2}: no candidate repeats another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_deepthink.producers.deepthink import rotary

MOMENTUM_STEPS = (0.01, 0.03)
MOMENTUM_BETAS = (0.9, 0.0)
EMA_ETAS = (0.05, 0.1, 0.2)
# The ema weight when none is given (see README, "Building"): the ACL'24 default 0.01
# closes only 13% of the gap to a fixed target in 15 iterations (1 - 0.99**14); 0.1 was
# measured to collapse SmolLM2 SST-2 and TREC within 4-5 iterations (dev 82.7 -> 54.0,
# 40.3 -> 4.3), before selection can see anything; 0.05 closes 51%, about what the
# published momentum 0.01 / 0.9 closes (60%).
DEFAULT_EMA_ETA = 0.05
DEFAULT_STEP_SIZE = 0.01
DEFAULT_BETA = 0.9


@dataclass(frozen=True)
class Candidate:
    optimizer: str
    params: dict[str, float] = field(hash=False)
    position_mode: str = "published"

    @property
    def name(self) -> str:
        args = ",".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.optimizer}({args})/{self.position_mode}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "optimizer": self.optimizer,
                "optimizer_params": dict(self.params), "position_mode": self.position_mode}


# The builder's default candidate, for every model: the published v1 code, position mode
# included. Measured (README, "Building"; results/README.md): on SmolLM2-135M it left T=1
# only where ICL had collapsed onto one label and gained +9.7 to +20.6 points there; on the
# same demonstrations "aligned" at this strength gained 6.8-9.7 points less on three of
# those four rows and as much on the fourth; aligned updates won only inside a search, at
# other strengths, and published-position candidates won some searches too (counts in
# results/README.md, "Position mode"), so both modes stay in the --search grid.
PUBLISHED = Candidate("momentum", {"step_size": DEFAULT_STEP_SIZE, "beta": DEFAULT_BETA})


def position_modes(config) -> tuple[str, ...]:
    """("published", "aligned") when the model's rotary embedding can be undone, else
    ("published",)."""
    try:
        rotary.check_invertible(config)
    except rotary.RotaryError:
        return ("published",)
    return ("published", "aligned")


def search_grid(modes: tuple[str, ...] = ("published",)) -> list[Candidate]:
    """The documented grid, published default first."""
    grid = []
    for mode in modes:
        for step in MOMENTUM_STEPS:
            for beta in MOMENTUM_BETAS:
                grid.append(Candidate("momentum", {"step_size": step, "beta": beta}, mode))
        for eta in EMA_ETAS:
            grid.append(Candidate("ema", {"eta": eta}, mode))
    return grid
