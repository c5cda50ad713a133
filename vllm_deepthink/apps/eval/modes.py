"""The modes of an evaluation, each a prefix before the same items (tasks/scoring.py
scores them choice by choice):

  zero-shot  the query alone, after the tokenizer's special prefix (BOS if it adds one,
             i.e. the ids of an empty demonstration string);
  icl        the adapter's own demonstration ids (config.demo_token_ids) before the query;
  deepthink  the adapter's K/V as a prefix (positions 0..L-1), the query from position L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODES = ("zero-shot", "icl", "deepthink")
ADAPTER_NAME = "eval"


class EvalError(ValueError):
    """A request the evaluation cannot serve (e.g. calibrating a multiple-choice task);
    the message names the parameters (`modes`)."""


def check_modes(modes: Sequence[str], has_adapter: bool) -> list[str]:
    """`modes` as a list, each one of MODES; icl and deepthink need an adapter."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise EvalError(f"`modes`: unknown mode(s) {unknown or list(modes)}; expected a "
                        f"comma-separated subset of {','.join(MODES)}")
    needs = [m for m in modes if m != "zero-shot"]
    if needs and not has_adapter:
        raise EvalError(f"`modes` {','.join(needs)} need `adapter` (icl uses the adapter's "
                        f"demonstrations, deepthink its K/V)")
    return list(modes)


def mode_prefix(mode: str, tokenizer, adapter) -> dict[str, Any]:
    """Keyword arguments of Scorer.score for a mode, and the prefix length."""
    if mode == "zero-shot":
        ids = list(tokenizer("")["input_ids"])
        return {"prefix_ids": ids, "prefix_len": len(ids)}
    if mode == "icl":
        return {"prefix_ids": list(adapter.config.demo_token_ids),
                "prefix_len": adapter.config.prefix_len}
    return {"adapter": ADAPTER_NAME, "prefix_len": adapter.config.prefix_len}


def max_prompt_len(tokenizer, task, rows, adapter, modes, extra_items=()) -> int:
    """Tokens of the longest prompt any mode sends (prefix + query + choice)."""
    from vllm_deepthink.tasks.scoring import encode_items, items_from_rows

    encoded = encode_items(tokenizer, items_from_rows(task, rows) + list(extra_items))
    longest = max(len(e.query_ids) + max(len(c) for c in e.choice_ids) for e in encoded)
    prefix = max(mode_prefix(m, tokenizer, adapter)["prefix_len"] for m in modes)
    return prefix + longest
