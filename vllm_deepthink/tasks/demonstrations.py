"""Demonstrations drawn from a task's train rows (`sample_demos`), fitted to a token
budget by replacing the longest demonstration with a shorter row of the same label,
every replacement recorded."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_deepthink.tasks.task import CLASSIFICATION, Task, TaskError, rows_by_label


@dataclass
class DemoSample:
    """Demonstrations drawn from train: `text` is the demos joined by the task
    separator (ending with it); `indices` are their train row indices, in order.
    `fit` records what sample_demos did to respect a token budget (None: no budget
    given): {"max_tokens", "tokens_first_draw", "tokens", "replaced": [[old, new]...]}."""

    text: str
    indices: list[int]
    rows: list[dict] = field(repr=False)
    fit: dict[str, Any] | None = None


def _demo_text(task: Task, rows: list[dict], indices: list[int]) -> str:
    return "".join(task.format_demo(rows[i]) + task.separator for i in indices)


def sample_demos(task: Task, shots_per_class: int, seed: int, *,
                 max_tokens: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> DemoSample:
    """Demonstrations from train: `shots_per_class` per label for classification
    (stratified, then shuffled), `shots_per_class` demos in all for multiple choice.

    With `max_tokens` (and `count_tokens`, text -> its token count as the builder
    tokenizes demos), a draw longer than the budget is repaired, never truncated:
    the longest demonstration is replaced by a row of the same label (any row for
    multiple choice) drawn at random among the unused rows that are shorter than it,
    until the text fits; the order of the demonstrations is kept. Per-class counts
    stay the same; the repair biases the sample toward shorter rows, and `fit`
    records every replacement. TaskError when no such row is left.
    """
    if shots_per_class < 1:
        raise TaskError(f"shots_per_class must be >= 1, found {shots_per_class}")
    if (max_tokens is None) != (count_tokens is None):
        raise TaskError("give max_tokens and count_tokens together")
    rows = task.rows("train")
    rng = random.Random(seed)
    if task.kind == CLASSIFICATION:
        by_label = rows_by_label(task, rows, list(range(len(rows))))
        indices = []
        for label in range(len(task.label_words)):
            pool = by_label.get(label, [])
            if len(pool) < shots_per_class:
                raise TaskError(
                    f"task {task.name!r}: train.jsonl has {len(pool)} rows of label {label} "
                    f"({task.label_words[label]!r}), fewer than shots_per_class="
                    f"{shots_per_class}; lower it or add rows.")
            indices.extend(rng.sample(pool, shots_per_class))
        rng.shuffle(indices)
    else:
        if len(rows) < shots_per_class:
            raise TaskError(f"task {task.name!r}: train.jsonl has {len(rows)} rows, fewer than "
                            f"the {shots_per_class} demonstrations asked for.")
        indices = rng.sample(range(len(rows)), shots_per_class)
    fit = None
    if max_tokens is not None:
        indices, fit = _fit_demos(task, rows, indices, max_tokens, count_tokens, rng)
    demo_rows = [rows[i] for i in indices]
    return DemoSample(text=_demo_text(task, rows, indices), indices=indices, rows=demo_rows,
                      fit=fit)


def _fit_demos(task: Task, rows: list[dict], indices: list[int], max_tokens: int,
               count_tokens: Callable[[str], int], rng: random.Random
               ) -> tuple[list[int], dict[str, Any]]:
    """See sample_demos: replace the longest demo until the text fits max_tokens."""
    indices = list(indices)
    first = count_tokens(_demo_text(task, rows, indices))
    tokens, replaced = first, []
    lengths: dict[int, int] = {}

    def length(i: int) -> int:
        if i not in lengths:
            lengths[i] = count_tokens(task.format_demo(rows[i]) + task.separator)
        return lengths[i]

    tried = set(indices)
    while tokens > max_tokens:
        slot = max(range(len(indices)), key=lambda k: (length(indices[k]), -k))
        old = indices[slot]
        same = [i for i in range(len(rows)) if i not in tried
                and (task.kind != CLASSIFICATION or task.label(rows[i]) == task.label(rows[old]))]
        # Random candidates of that label, the first one shorter than the old demo wins.
        rng.shuffle(same)
        new = next((i for i in same if length(i) < length(old)), None)
        if new is None:
            raise TaskError(
                f"task {task.name!r}: the demonstrations are {tokens} tokens, more than the "
                f"{max_tokens} the model allows (Deep-Thinking runs them at positions L..2L-1), "
                f"and no shorter train row of the same label is left to replace the longest "
                f"one. Use fewer shots per class.")
        tried.add(new)
        indices[slot] = new
        replaced.append([old, new])
        tokens = count_tokens(_demo_text(task, rows, indices))
    return indices, {"max_tokens": max_tokens, "tokens_first_draw": first, "tokens": tokens,
                     "replaced": replaced}
