"""Deterministic benchmark workloads: per-task demonstrations and the request stream.

A workload is (number of tasks, prefix length L, query length, output length,
number of requests). Every system of a run sees exactly the same token ids:

- task t's demonstrations: L token ids that start with BOS (demos carry special
  tokens, DESIGN.md), either synthetic (seeded random non-special ids) or taken
  from a task directory (train rows formatted as "text\\nlabel word\\n\\n",
  sampled with seed + t, concatenated, clipped to exactly L ids);
- the queries: `query_len` ids each without special tokens, synthetic or cut
  from the token stream of the task directory's test rows;
- request i belongs to task `task_of[i]`: a seeded permutation of round-robin
  assignments, so the batch mixes tasks and every task gets n/T (+1) requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workload:
    num_tasks: int
    prefix_len: int
    query_len: int
    output_len: int
    num_requests: int

    @property
    def kind(self) -> str:
        return "scoring" if self.output_len == 1 else "generation"

    @property
    def key(self) -> str:
        return (f"tasks{self.num_tasks}-prefix{self.prefix_len}-query{self.query_len}"
                f"-out{self.output_len}-n{self.num_requests}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}


@dataclass
class RequestSet:
    """Token ids of one workload: demos per task, and one (task, query) per request."""

    demos: list[list[int]]       # [num_tasks][prefix_len]
    task_of: list[int]           # [num_requests]
    queries: list[list[int]]     # [num_requests][query_len]


def clip_prefix_len(prefix_len: int, query_len: int, output_len: int,
                    max_positions: int) -> int:
    """The largest prefix length <= prefix_len that leaves room for query and output."""
    room = max_positions - query_len - output_len
    if room < 1:
        raise ValueError(
            f"query length {query_len} + output length {output_len} leave no room for a "
            f"prefix in the model's {max_positions} positions; use shorter queries/outputs.")
    return min(prefix_len, room)


def make_request_set(tokenizer, workload: Workload, *, seed: int = 0,
                     task_dir: str | Path | None = None, query_seed_offset: int = 0
                     ) -> RequestSet:
    """Demos, task assignment and queries for `workload` (deterministic in `seed`).

    `query_seed_offset` gives a disjoint query set with the same demos (warm-up)."""
    if task_dir is not None:
        rows = _with_label_words(_read_rows(Path(task_dir), "train"), Path(task_dir))
        demos = [_demos_from_rows(tokenizer, rows, workload.prefix_len, seed + t)
                 for t in range(workload.num_tasks)]
        test_rows = _read_rows(Path(task_dir), _test_split(Path(task_dir)))
        queries = _queries_from_rows(tokenizer, test_rows, workload.query_len,
                                     workload.num_requests, seed + 7919 + query_seed_offset)
    else:
        ids = _plain_token_ids(tokenizer)
        bos = _bos_id(tokenizer)
        demos = []
        for t in range(workload.num_tasks):
            rng = random.Random(f"demos-{seed}-{t}")
            demos.append([bos] + [rng.choice(ids) for _ in range(workload.prefix_len - 1)])
        rng = random.Random(f"queries-{seed}-{query_seed_offset}")
        queries = [[rng.choice(ids) for _ in range(workload.query_len)]
                   for _ in range(workload.num_requests)]
    task_of = [i % workload.num_tasks for i in range(workload.num_requests)]
    random.Random(f"tasks-{seed}-{query_seed_offset}").shuffle(task_of)
    return RequestSet(demos=demos, task_of=task_of, queries=queries)


def _bos_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        if len(with_special) > len(without):
            return with_special[0]
        raise ValueError(
            "the tokenizer has no BOS token and adds no special tokens; the benchmark's "
            "synthetic demos start with BOS. Use a task directory (--task-dir) instead.")
    return bos


def _plain_token_ids(tokenizer) -> list[int]:
    """Ids of ordinary tokens (no special or added tokens), sorted."""
    special = set(tokenizer.all_special_ids)
    vocab_size = len(tokenizer)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(vocab_size) if i not in special and i not in added]
    if len(ids) < 2:
        raise ValueError(f"tokenizer has only {len(ids)} ordinary tokens; cannot make queries")
    return ids


def _test_split(task_dir: Path) -> str:
    for split in ("test", "validation"):
        if (task_dir / f"{split}.jsonl").is_file():
            return split
    raise FileNotFoundError(
        f"{task_dir}: expected test.jsonl or validation.jsonl (a ../shared/data task dir)")


def _read_rows(task_dir: Path, split: str) -> list[dict[str, Any]]:
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; --task-dir must hold train.jsonl and test.jsonl "
            f"(or validation.jsonl), as the directories in ../shared/data do")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _with_label_words(rows: list[dict[str, Any]], task_dir: Path) -> list[dict[str, Any]]:
    path = task_dir / "verbalizers.json"
    if not path.is_file() or "text" not in rows[0]:
        return rows
    words = json.loads(path.read_text(encoding="utf-8"))
    return [{**row, "label_word": words[int(row["label"])]} for row in rows]


def _format_row(row: dict[str, Any], with_answer: bool) -> str:
    """A demonstration or query line; classification {text,label} or multiple choice
    {question, choices, label}. Label words are the label index when unknown."""
    if "text" in row:
        body = f"Input: {row['text']}\nLabel:"
        answer = str(row.get("label_word", row.get("label", "")))
    else:
        body = f"Question: {row.get('question', '')}\nAnswer:"
        choices = row.get("choices") or [""]
        answer = str(choices[int(row.get("label", 0)) % len(choices)])
    return f"{body} {answer}\n\n" if with_answer else body


def _demos_from_rows(tokenizer, rows, prefix_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    ids: list[int] = []
    text = ""
    for index in order:
        text += _format_row(rows[index], with_answer=True)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= prefix_len:
            return ids[:prefix_len]
    raise ValueError(f"the task's train rows give only {len(ids)} demo tokens, "
                     f"fewer than the prefix length {prefix_len}; use a shorter --prefix-len")


def _queries_from_rows(tokenizer, rows, query_len: int, count: int, seed: int
                       ) -> list[list[int]]:
    rng = random.Random(seed)
    stream: list[int] = []
    queries: list[list[int]] = []
    passes = 0
    while len(queries) < count:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for index in order:
            stream += tokenizer(_format_row(rows[index], with_answer=False) + "\n\n",
                                add_special_tokens=False)["input_ids"]
            while len(stream) >= query_len and len(queries) < count:
                queries.append(stream[:query_len])
                stream = stream[query_len:]
            if len(queries) >= count:
                break
        passes += 1
        if passes > 1000:
            raise ValueError("the task's test rows are too short to cut queries from")
    return queries
