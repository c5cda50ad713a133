"""The queries a prefix is compressed for: a task's train rows rendered with its template
(labels unused), or a file of queries; and their digest for the record."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_COUNT = 256


class QueriesError(ValueError):
    """Queries that cannot be read; the message says what was expected."""


def queries_digest(queries: Sequence[str]) -> str:
    """sha256 of the queries' JSON list (order included)."""
    data = json.dumps(list(queries), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def read_queries_file(path: str | Path) -> list[str]:
    """One query per line, verbatim; a `.jsonl` file holds one JSON string (or an object
    with "query") per line, for queries that contain line breaks. Empty lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise QueriesError(f"{path}: no such queries file")
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QueriesError(f"{path}:{number}: not JSON ({exc.msg}); a .jsonl queries "
                                   f"file holds a JSON string or {{\"query\": ...}} per line")
            value = value.get("query") if isinstance(value, dict) else value
            if not isinstance(value, str) or not value:
                raise QueriesError(f"{path}:{number}: expected a non-empty string or "
                                   f"{{\"query\": string}}, found {value!r}")
            line = value
        queries.append(line)
    if not queries:
        raise QueriesError(f"{path}: no queries (one per line expected)")
    return queries


def task_queries(task, count: int = DEFAULT_COUNT, seed: int = 0,
                 exclude: Sequence[int] = ()) -> tuple[list[str], dict[str, Any]]:
    """Up to `count` train rows of `task` (not the `exclude`d demonstration indices),
    drawn with `seed`, rendered with the task's template; and what they were."""
    from vllm_deepthink import tasks

    rows = tasks.dev_split(task, count, seed, exclude=set(exclude), split="train")
    if not rows:
        raise QueriesError(f"task {task.name!r} has no train rows to draw queries from")
    info = {"source": "task", "task": task.name, "split": "train", "seed": seed,
            "excluded_demo_rows": len(exclude)}
    return [task.format_query(r) for r in rows], info


def task_choices(task) -> list[str] | None:
    """The label choices of a classification task (one set for every row), else None."""
    from vllm_deepthink import tasks

    if task.kind != tasks.CLASSIFICATION:
        return None
    rows = task.rows("train")
    return task.choices(rows[0]) if rows else None
