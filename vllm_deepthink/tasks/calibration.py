"""Label calibration of choice scores (pure functions, no model).

A model with demonstrations in front is biased toward some labels (the majority
label of the demos, the last one, a frequent token). Calibration divides each
label's probability by the model's prior for it and takes the argmax of what is
left. Both methods here estimate that prior the same way, from different inputs:

    p_i   = softmax over the choices of item i's scores      (renormalized)
    prior = mean_i p_i                                       (a distribution)
    calibrated score of choice j = log p_ij - log prior_j    (argmax = prediction)

- `content-free` (Zhao et al. 2021, "Calibrate Before Use"): the inputs are
  content-free strings ("N/A", "", "[MASK]") put through the task's template;
  three extra queries per prefix.
- `dev-prior`: the inputs are the dev split's queries (their labels are not used);
  one pass over the dev split per prefix.

Zhao et al.'s W = diag(prior)^-1 followed by a softmax gives the same argmax. With
`normalize` (acc_norm) the scores are mean log-probabilities per token, and the
prior must be estimated from normalized scores too.

For a classification task whose label words are one token each, subtracting
log prior_j from label j's logit and taking the argmax over the label tokens gives
the same answer: `logit_bias` is that bias as vLLM's per-request `logit_bias`
(docs/evaluation.md, "Served calibration").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

METHODS = ("none", "content-free", "dev-prior")
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")

Score = tuple[float, int]


def _values(item: Sequence[Score], normalize: bool) -> list[float]:
    return [s / n if normalize else s for s, n in item]


def log_softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


def log_prior(scores: Sequence[Sequence[Score]], normalize: bool = False) -> list[float]:
    """log of the mean, over items, of each item's choice distribution (renormalized
    over its choices). All items must have the same number of choices."""
    if not scores:
        raise ValueError("a prior needs at least one scored item")
    width = len(scores[0])
    if any(len(item) != width for item in scores):
        raise ValueError("every item must have the same choices (a classification task) to "
                         "estimate a label prior; multiple-choice items differ in number")
    mean = [0.0] * width
    for item in scores:
        for j, lp in enumerate(log_softmax(_values(item, normalize))):
            mean[j] += math.exp(lp) / len(scores)
    return [math.log(m) if m > 0 else -math.inf for m in mean]


def label_priors(dev_scores: Sequence[Sequence[Score]],
                 content_free_scores: Sequence[Sequence[Score]] | None = None,
                 normalize: bool = False) -> dict[str, list[float]]:
    """The label prior of each method a prefix's scores allow: {"dev-prior": from the dev
    items' scores, "content-free": from the content-free queries' scores (when given)}."""
    priors = {"dev-prior": log_prior(dev_scores, normalize)}
    if content_free_scores is not None:
        priors["content-free"] = log_prior(content_free_scores, normalize)
    return priors


def calibrated(scores: Sequence[Sequence[Score]], prior: Sequence[float],
               normalize: bool = False) -> list[list[float]]:
    """[item][choice] -> log p_ij - log prior_j (higher is better)."""
    out = []
    for item in scores:
        if len(item) != len(prior):
            raise ValueError(f"an item has {len(item)} choices but the prior {len(prior)}")
        out.append([lp - b for lp, b in zip(log_softmax(_values(item, normalize)), prior)])
    return out


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, ties going to the lowest index (as scoring.predictions)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def calibrated_predictions(scores: Sequence[Sequence[Score]], prior: Sequence[float],
                           normalize: bool = False) -> list[int]:
    return [argmax(item) for item in calibrated(scores, prior, normalize)]


def content_free_rows(task, inputs: Sequence[str] = CONTENT_FREE_INPUTS) -> list[dict]:
    """Rows whose every template field is a content-free string (label 0, unused)."""
    from vllm_deepthink.tasks.task import CLASSIFICATION, template_fields

    if task.kind != CLASSIFICATION:
        raise ValueError(f"task {task.name!r} is {task.kind}: calibration needs a fixed label "
                         f"set (a classification task); multiple-choice items have their own "
                         f"choices")
    fields = template_fields(task)
    return [{**{name: text for name in fields}, "label": 0} for text in inputs]


def logit_bias(label_token_ids: Sequence[int], prior: Sequence[float]) -> dict[int, float]:
    """{label token id: -log prior}: vLLM's `logit_bias` that calibrates a greedy answer
    restricted (allowed_token_ids) to the label tokens. vLLM clamps each bias to
    [-100, 100]; a prior below e^-100 is clamped the same way here."""
    if len(label_token_ids) != len(prior):
        raise ValueError(f"{len(label_token_ids)} label tokens but a prior over {len(prior)}")
    return {int(t): float(min(100.0, max(-100.0, -b))) for t, b in zip(label_token_ids, prior)}
