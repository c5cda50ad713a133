"""The rows a task is scored on: dev splits drawn for selection (`dev_split`, rebuilt
from a build's record by `dev_split_of`; random, stratification optional, never the
evaluated split) and the evaluation rows (`eval_rows`)."""

from __future__ import annotations

import random
from typing import Any

from vllm_deepthink.tasks.task import CLASSIFICATION, SPLITS, Task, TaskError, rows_by_label


def dev_split(task: Task, size: int, seed: int, exclude: set[int], *,
              stratify: bool = False, split: str = "train",
              evaluated: str | None = None) -> list[dict]:
    """Up to `size` rows of `split` (default train) not in `exclude` (the demos' train
    indices), drawn at random with `seed` (so the label mix follows the split's); with
    `stratify` (classification), an equal number per label as far as the split allows.
    Shuffled. `evaluated`: the split being evaluated (default the task's evaluation
    split), which the dev split may not be."""
    return [task.rows(split)[i] for i in dev_indices(task, size, seed, exclude,
                                                     stratify=stratify, split=split,
                                                     evaluated=evaluated)]


def dev_indices(task: Task, size: int, seed: int, exclude: set[int], *,
                stratify: bool = False, split: str = "train",
                evaluated: str | None = None) -> list[int]:
    """The row indices (in `split`) of dev_split, in dev order. `exclude` holds train
    indices, so it applies to the train split only. The evaluated split is refused, and a
    held-out split's rows that also occur in it are left out of the draw (the train split
    keeps its historical draw: its overlap with test is the dataset's own)."""
    evaluated = evaluated or task.eval_split
    _check_dev_split(task, split, evaluated)
    rows = task.rows(split)
    if split == "train":
        skip = exclude
    else:
        seen = {_row_key(task, row) for row in task.rows(evaluated)}
        skip = {i for i, row in enumerate(rows) if _row_key(task, row) in seen}
    pool = [i for i in range(len(rows)) if i not in skip]
    if not pool:
        why = (f"after excluding the {len(exclude)} demonstrations" if split == "train" else
               f"that are not also in the evaluated split {evaluated!r} (does the task map "
               f"both to the same data?)")
        raise TaskError(f"task {task.name!r}: no {split} rows {why} are left for a dev split.")
    if size < 1:
        raise TaskError(f"the dev split needs size >= 1, found {size}")
    rng = random.Random(seed)
    size = min(size, len(pool))
    if stratify and task.kind == CLASSIFICATION:
        by_label = rows_by_label(task, rows, pool)
        per_label = size // len(by_label)
        chosen = []
        for label in sorted(by_label):
            chosen.extend(rng.sample(by_label[label], min(per_label, len(by_label[label]))))
        rest = sorted(set(pool) - set(chosen))
        chosen.extend(rng.sample(rest, size - len(chosen)))
        rng.shuffle(chosen)
    else:
        chosen = rng.sample(pool, size)
    return chosen


def _check_dev_split(task: Task, split: str, evaluated: str) -> None:
    """Raise TaskError unless `split` can hold a dev split of `task` evaluated on
    `evaluated`: train (drawn disjoint from the demos) or another held-out split."""
    if split == evaluated:
        raise TaskError(
            f"task {task.name!r}: {split!r} is the split being evaluated; a dev split drawn "
            f"from it would choose on the evaluated items. Draw it from "
            f"{_other_splits(task, evaluated)}.")
    if not task.has_split(split):  # an unknown split name raises in split_path
        raise TaskError(f"task {task.name!r} has no {split!r} split ({split}.jsonl in "
                        f"{task.directory}, or a dataset split mapped to it); the dev split "
                        f"can come from {_other_splits(task, evaluated)}.")


def _other_splits(task: Task, evaluated: str) -> str:
    found = [s for s in SPLITS if s != evaluated and task.has_split(s)]
    return " or ".join(repr(s) for s in found) or "no other split"


def _row_key(task: Task, row: dict) -> tuple[str, tuple[str, ...]]:
    """What a row puts before the model: its query and its choices (not bookkeeping
    fields such as an id, which differ between copies of the same item)."""
    return task.format_query(row), tuple(task.choices(row))


def dev_split_of(task: Task, record: dict[str, Any]) -> list[dict]:
    """The dev split a build drew, from its record (DeepThinkConfig.task: dev_size,
    seed or dev_seed, demo_indices, dev_stratified, dev_split)."""
    missing = [k for k in ("dev_size", "seed", "demo_indices") if k not in record]
    if missing:
        raise TaskError(f"the build record lacks {missing}: the adapter was not selected on "
                        f"a dev split of a task directory")
    return dev_split(task, int(record["dev_size"]), int(record.get("dev_seed", record["seed"])),
                     exclude=set(record["demo_indices"]),
                     stratify=bool(record.get("dev_stratified", False)),
                     split=str(record.get("dev_split", "train")))


def eval_rows(task: Task, split: str | None = None, limit: int | None = None,
              seed: int = 0) -> list[dict]:
    """Rows to evaluate on: the task's eval split (or `split`); with `limit`, a random
    subset of that size drawn with `seed`, kept in file order."""
    rows = task.rows(split or task.eval_split)
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise TaskError(f"limit must be >= 1, found {limit}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]
