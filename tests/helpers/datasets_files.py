"""A small review-sentiment dataset as local csv files with its task.json (the column
mapping of tasks/datasets.py), for tests of `--dataset`."""

from __future__ import annotations

import json
from pathlib import Path

REVIEWS_TASK = {"kind": "classification", "name": "reviews",
                "template": "Review: {text}\nSentiment: {label}", "label_words": ["bad", "good"],
                "text_column": "review", "label_column": "sentiment"}


def write_reviews_dataset(directory: str | Path, rows: int = 24) -> Path:
    """train.csv (`rows` rows, labels alternating as words), test.csv and task.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.csv").write_text("review,sentiment\n" + "".join(
        f"review number {n} was {'fine' if n % 2 else 'dull'},{'good' if n % 2 else 'bad'}\n"
        for n in range(rows)))
    (directory / "test.csv").write_text("review,sentiment\nfine work,good\ndull work,bad\n")
    (directory / "task.json").write_text(json.dumps(REVIEWS_TASK))
    return directory
