"""Deterministic benchmark workloads: per-task demonstrations and the request stream.

A workload is (number of tasks, prefix length L, query length, output length,
number of requests). Every system of a run sees exactly the same token ids:

- task t's demonstrations: L token ids that start with BOS (demos carry special
  tokens, DESIGN.md). Synthetic: BOS + seeded random word tokens (see
  `word_token_ids`). From a task directory (`vllm_deepthink.tasks.datasets.open_task`): the
  task's own demonstrations (`sample_demos` with seed + t, its template and separator),
  as many shots as L ids need, tokenized as the builder does, clipped to exactly L ids;
- the queries: `query_len` ids each without special tokens, synthetic word tokens or
  cut from the token stream of the task's formatted evaluation queries;
- request i belongs to task `task_of[i]`: a seeded permutation of round-robin
  assignments, so the batch mixes tasks and every task gets n/T (+1) requests.
"""

from __future__ import annotations

import functools
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


def max_model_len(workloads: list[Workload]) -> int:
    """The engine's max_model_len that fits every workload's requests."""
    return max(w.prefix_len + w.query_len + w.output_len for w in workloads)


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
        from vllm_deepthink.tasks.datasets import open_task

        task = open_task(task_dir)
        demos = [_task_demos(tokenizer, task, workload.prefix_len, seed + t)
                 for t in range(workload.num_tasks)]
        queries = _task_queries(tokenizer, task, workload.query_len, workload.num_requests,
                                seed + 7919 + query_seed_offset)
    else:
        ids = word_token_ids(tokenizer)
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


@functools.lru_cache(maxsize=4)
def word_token_ids(tokenizer) -> list[int]:
    """Ids of ordinary tokens whose text is a space and letters (" film") and that
    tokenize back to themselves, sorted. With a tokenizer that splits text at spaces
    before merging (GPT-2 style byte-level BPE), any sequence of them is its own
    tokenization, so the text of a synthetic prompt reproduces its ids (server mode
    sends text). Every ordinary token when a tokenizer has fewer than two of them."""
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ordinary = [i for i in range(len(tokenizer)) if i not in special and i not in added]
    words = []
    for i in ordinary:
        text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if (text.startswith(" ") and text[1:].isalpha()
                and tokenizer.encode(text, add_special_tokens=False) == [i]):
            words.append(i)
    if len(words) >= 2:
        return words
    if len(ordinary) < 2:
        raise ValueError(f"tokenizer has only {len(ordinary)} ordinary tokens; "
                         f"cannot make queries")
    return ordinary


def _task_demos(tokenizer, task, prefix_len: int, seed: int) -> list[int]:
    """The task's demonstrations (one more shot per label until they reach L ids),
    tokenized with special tokens as the builder does, clipped to L."""
    from vllm_deepthink.producers.deepthink.builder import tokenize_demos
    from vllm_deepthink.tasks import TaskError, sample_demos

    ids: list[int] = []
    shots = 0
    while len(ids) < prefix_len:
        shots += 1
        try:
            ids = tokenize_demos(tokenizer, sample_demos(task, shots, seed).text)
        except TaskError as exc:
            raise ValueError(
                f"task {task.name!r}: its train rows give only {len(ids)} demo tokens "
                f"({shots - 1} shots), fewer than the prefix length {prefix_len} ({exc}); "
                f"use a shorter --prefix-len or a task with more train rows") from None
    return ids[:prefix_len]


def _task_queries(tokenizer, task, query_len: int, count: int, seed: int) -> list[list[int]]:
    """`count` queries of `query_len` ids cut from the token stream of the task's
    evaluation queries (each formatted by the task's template, then its separator)."""
    from vllm_deepthink.tasks import eval_rows

    texts = [task.format_query(row) + task.separator for row in eval_rows(task)]
    rng = random.Random(seed)
    stream: list[int] = []
    queries: list[list[int]] = []
    for _ in range(1000):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for index in order:
            stream += tokenizer(texts[index], add_special_tokens=False)["input_ids"]
            while len(stream) >= query_len and len(queries) < count:
                queries.append(stream[:query_len])
                stream = stream[query_len:]
            if len(queries) == count:
                return queries
    raise ValueError(f"task {task.name!r}: its evaluation rows are too short to cut "
                     f"{count} queries of {query_len} tokens from")
