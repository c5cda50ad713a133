"""The columns of a results row, from the test scores of each prefix:

  zero-shot    the query alone (after BOS)
  icl          the demonstrations' ids before the query (= Deep-Thinking iteration 1)
  icl+cf       ICL, content-free calibrated (Zhao et al. 2021)
  icl+dev      ICL, dev-prior calibrated
  dt           Deep-Thinking, published defaults (momentum 0.01 / 0.9), T chosen on
               dev by the builder's protocol (selection.py)
  dt+cf/+dev   that adapter, calibrated
  dt-search    Deep-Thinking with --search (the grid of search.py, selected on dev)
  dt-oracle    the published-default run with T picked on the TEST split: an upper
               bound comparable to the paper's protocol, never used for a claim

and the paired comparisons between them (the difference with a 95% paired-bootstrap
interval, the exact McNemar p-value).
"""

from __future__ import annotations

from typing import Any


def rounded_scores(scores) -> list[list[float]]:
    return [[round(float(s), 5) for s, _ in item] for item in scores]


def _column(scores, labels, prior=None, prior_norm=None) -> dict[str, Any]:
    from vllm_deepthink.tasks import calibration, scoring

    if prior is None:
        preds = scoring.predictions(scores)
        preds_norm = scoring.predictions(scores, normalize=True)
    else:
        preds = calibration.calibrated_predictions(scores, prior)
        preds_norm = calibration.calibrated_predictions(scores, prior_norm, normalize=True)
    return {"acc": scoring.prediction_accuracy(preds, labels),
            "acc_norm": scoring.prediction_accuracy(preds_norm, labels),
            "predictions": preds}


def row_priors(dev_result) -> dict[str, Any] | None:
    """Content-free and dev-prior log-priors (plain and per-token) of one prefix."""
    from vllm_deepthink.tasks import calibration

    if dev_result is None or dev_result.cf_scores is None:
        return None
    plain = calibration.label_priors(dev_result.scores, dev_result.cf_scores)
    norm = calibration.label_priors(dev_result.scores, dev_result.cf_scores, normalize=True)
    return {"content-free": plain["content-free"], "content-free_norm": norm["content-free"],
            "dev-prior": plain["dev-prior"], "dev-prior_norm": norm["dev-prior"]}


def paired(a_preds, b_preds, labels) -> dict[str, Any]:
    """B against A on the same items: acc(B) - acc(A), its 95% paired-bootstrap interval,
    the discordant counts and the exact McNemar p-value."""
    from vllm_deepthink.tasks import stats

    a = [p == y for p, y in zip(a_preds, labels)]
    b = [p == y for p, y in zip(b_preds, labels)]
    only_a, only_b = stats.paired_counts(a, b)
    diff, lo, hi = stats.paired_bootstrap(a, b)
    return {"diff": diff, "ci95": [lo, hi], "discordant": [only_a, only_b],
            "mcnemar_p": stats.mcnemar_p(only_a, only_b)}


COMPARISONS = {"dt vs icl": ("icl", "dt"), "dt-search vs icl": ("icl", "dt-search"),
               "dt vs icl+dev": ("icl+dev", "dt"), "dt vs icl+cf": ("icl+cf", "dt"),
               "dt+dev vs icl+dev": ("icl+dev", "dt+dev"),
               "dt-search vs icl+dev": ("icl+dev", "dt-search"),
               "dt-search+dev vs icl+dev": ("icl+dev", "dt-search+dev"),
               "icl+dev vs icl": ("icl", "icl+dev")}


def row_columns(zero_shot, tests: dict[str, Any], labels, priors: dict[str, Any],
                skip_search: bool) -> dict[str, dict[str, Any]]:
    """Every column: the plain ones, then each base calibrated with its own priors."""
    names = ["icl", "dt"] + ([] if skip_search else ["dt-search"])
    columns = {"zero-shot": _column(zero_shot, labels)}
    columns.update({name: _column(tests[name], labels) for name in names + ["dt-oracle"]})
    for base in names:
        if priors[base] is not None:
            for method in ("content-free", "dev-prior"):
                suffix = "cf" if method == "content-free" else "dev"
                columns[f"{base}+{suffix}"] = _column(tests[base], labels, priors[base][method],
                                                      priors[base][method + "_norm"])
    return columns


def paired_comparisons(columns: dict[str, dict[str, Any]], labels) -> dict[str, Any]:
    return {name: paired(columns[a]["predictions"], columns[b]["predictions"], labels)
            for name, (a, b) in COMPARISONS.items() if a in columns and b in columns}

