"""Dev scoring of a build: DevSet (the dev queries tokenized and planned once,
tasks.scoring.score_plan), one dev pass per iteration (score_dev) and the kept
iteration's label calibration."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_deepthink.producers.deepthink.errors import BuildError


@dataclass
class DevSet:
    """Dev queries tokenized and planned once (every dev pass reuses the plan).

    plan / labels: the dev items; cf_plan: the content-free queries of a
    classification task (tasks.calibration), scored at every iteration too (3 queries);
    label_token_ids: the label words' token ids when each is one token, else None.
    """

    plan: Any
    labels: list[int]
    cf_plan: Any | None = None
    cf_inputs: list[str] | None = None
    label_token_ids: list[int] | None = None
    batch_size: int = 16

    @classmethod
    def from_items(cls, tokenizer, items: Sequence[Any], content_free_items: Sequence[Any] = (),
                   batch_size: int = 16) -> DevSet:
        from vllm_deepthink.tasks import scoring

        if not items:
            raise BuildError("the dev split is empty; select on dev needs at least one item")
        encoded = scoring.encode_items(tokenizer, items)
        cf_plan = (scoring.make_plan(scoring.encode_items(tokenizer, content_free_items))
                   if content_free_items else None)
        token_ids = None
        if all(len(c) == 1 for e in encoded for c in e.choice_ids):
            first = [c[0] for c in encoded[0].choice_ids]
            if all([c[0] for c in e.choice_ids] == first for e in encoded):
                token_ids = first
        return cls(plan=scoring.make_plan(encoded), labels=[int(i.label) for i in items],
                   cf_plan=cf_plan, cf_inputs=[i.query for i in content_free_items] or None,
                   label_token_ids=token_ids, batch_size=batch_size)

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass
class DevResult:
    """One dev pass: per-choice scores, predictions and what the trace records."""

    scores: list[list[tuple[float, int]]]
    cf_scores: list[list[tuple[float, int]]] | None
    acc: float
    acc_norm: float
    counts: list[int]
    correct: list[bool]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "cf_scores": self.cf_scores, "acc": self.acc,
                "acc_norm": self.acc_norm, "counts": self.counts, "correct": self.correct,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DevResult:
        def pairs(rows):
            return None if rows is None else [[(float(s), int(n)) for s, n in r] for r in rows]

        return cls(scores=pairs(data["scores"]), cf_scores=pairs(data["cf_scores"]),
                   acc=data["acc"], acc_norm=data["acc_norm"], counts=list(data["counts"]),
                   correct=[bool(c) for c in data["correct"]], seconds=data["seconds"])

    def trace_entry(self, iteration: int) -> dict[str, Any]:
        from vllm_deepthink.tasks import calibration

        entry: dict[str, Any] = {"iteration": iteration, "dev_acc": self.acc,
                                 "dev_acc_norm": self.acc_norm, "dev_counts": self.counts,
                                 "dev_seconds": round(self.seconds, 3)}
        if self.cf_scores is not None:
            entry["cf_log_prior"] = calibration.log_prior(self.cf_scores)
        return entry


def score_dev(model, dev: DevSet, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
              ) -> DevResult:
    """Score the dev split (and the content-free queries) with keys/values as prefix
    (per layer [kv_heads, L, head_dim])."""
    from vllm_deepthink.tasks import scoring

    start = time.perf_counter()
    past = list(zip(keys, values))
    scores = scoring.score_plan(model, dev.plan, past_key_values=past, batch_size=dev.batch_size)
    cf = (scoring.score_plan(model, dev.cf_plan, past_key_values=past,
                             batch_size=dev.batch_size) if dev.cf_plan is not None else None)
    preds = scoring.predictions(scores)
    width = max(len(item) for item in scores)
    counts = [0] * width
    for p in preds:
        counts[p] += 1
    metrics = scoring.accuracy(scores, dev.labels)
    return DevResult(scores=scores, cf_scores=cf, acc=metrics["acc"],
                     acc_norm=metrics["acc_norm"], counts=counts,
                     correct=[p == y for p, y in zip(preds, dev.labels)],
                     seconds=time.perf_counter() - start)


def label_calibration(dev: DevSet | None, result: DevResult | None,
                      label_words: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The label calibration of the kept iteration (classification dev sets only):
    {"label_words", "label_token_ids", "content-free": {"log_prior", "inputs"},
    "dev-prior": {"log_prior", "n"}}; tasks.calibration explains both."""
    from vllm_deepthink.tasks import calibration

    if dev is None or result is None:
        return None
    widths = {len(item) for item in result.scores}
    if len(widths) != 1 or (result.cf_scores is None and label_words is None):
        return None
    priors = calibration.label_priors(result.scores, result.cf_scores)
    out: dict[str, Any] = {"label_words": list(label_words) if label_words else None,
                           "label_token_ids": dev.label_token_ids,
                           "dev-prior": {"log_prior": priors["dev-prior"],
                                         "n": len(result.scores)}}
    if "content-free" in priors:
        out["content-free"] = {"log_prior": priors["content-free"], "inputs": dev.cf_inputs}
    return out

