"""The selection protocol: min-iterations, patience, collapse stop, the guard, and the
search grid's bookkeeping (scripted dev accuracies on a tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_deepthink.producers.deepthink import builder, candidates, dev_scoring, search
from vllm_deepthink.producers.deepthink.iteration import deep_thinking_steps
from vllm_deepthink.producers.deepthink.selection import (SelectionPolicy, StopRule,
                                                          best_iteration, guard)

DEMOS = ("Review: a charming film\nSentiment: positive\n\n"
         "Review: contains no wit , only labored gags\nSentiment: negative\n\n")
N_DEV = 100


def run_rule(accs, **policy):
    rule = StopRule(SelectionPolicy(**policy))
    for t, acc in enumerate(accs, 1):
        reason = rule.update(t, acc)
        if reason:
            return t, rule.best_iteration, reason
    return len(accs), rule.best_iteration, None


# ----------------------------------------------------------------- StopRule

def test_patience_counts_only_after_min_iterations():
    accs = [0.5, 0.6] + [0.55] * 13
    # best at 2; patience 4 starting at 1 would stop at 6, min_iterations 8 runs to 12
    assert run_rule(accs, min_iterations=1, patience=4, collapse_drop=None)[:2] == (6, 2)
    assert run_rule(accs, min_iterations=8, patience=4, collapse_drop=None)[:2] == (12, 2)


def test_a_late_best_extends_the_run():
    accs = [0.5] * 9 + [0.7] + [0.6] * 5
    t, best, reason = run_rule(accs, min_iterations=8, patience=4, collapse_drop=None)
    assert (t, best) == (14, 10) and reason.startswith("patience")


def test_max_iterations_and_no_patience():
    accs = [0.5 + 0.01 * i for i in range(20)]
    assert run_rule(accs, max_iterations=15, patience=None, collapse_drop=None)[:2] == (15, 15)


def test_collapse_stops_before_min_iterations():
    accs = [0.8, 0.79, 0.7, 0.64, 0.6, 0.55, 0.5]
    t, best, reason = run_rule(accs, min_iterations=8, patience=4, collapse_drop=0.15)
    assert (t, best) == (5, 1) and reason.startswith("collapsed")
    # a single dip does not stop the run
    assert run_rule([0.8, 0.6, 0.8, 0.6, 0.8], min_iterations=8, collapse_drop=0.15)[0] == 5


def test_iterations_must_come_in_order():
    rule = StopRule(SelectionPolicy())
    rule.update(1, 0.5)
    with pytest.raises(ValueError, match="expected 2"):
        rule.update(3, 0.5)


def test_best_iteration_ties_go_to_the_earliest():
    assert best_iteration([0.5, 0.7, 0.7, 0.6]) == 2


@pytest.mark.parametrize("bad", [dict(min_iterations=0), dict(patience=0), dict(guard_k=-1),
                                 dict(collapse_drop=1.5), dict(max_iterations=0)])
def test_policy_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SelectionPolicy(**bad)


# ----------------------------------------------------------------- the guard

def correct(right: set[int]) -> list[bool]:
    return [i in right for i in range(N_DEV)]


def test_guard_against_a_hand_computation():
    t1 = correct(set(range(50)))
    better = correct(set(range(60)))            # b=0, c=10: gain .10, SE sqrt(10)/100
    g = guard(t1, better, k=2)
    assert g["discordant"] == [0, 10] and g["gain"] == pytest.approx(0.10)
    assert g["paired_se"] == pytest.approx(math.sqrt(10) / 100) and g["passed"]
    noisy = correct(set(range(10, 62)))         # b=10, c=12: gain .02, SE sqrt(22)/100
    g = guard(t1, noisy, k=2)
    assert g["discordant"] == [10, 12] and g["gain"] == pytest.approx(0.02)
    assert g["paired_se"] == pytest.approx(math.sqrt(22) / 100) and not g["passed"]
    assert guard(t1, noisy, k=0)["passed"]      # k=0: any strict gain
    assert not guard(t1, t1, k=0)["passed"]     # no gain never passes


# ----------------------------------------------------------------- runs, choose, the grid

def fake_result(right: set[int]) -> dev_scoring.DevResult:
    c = correct(right)
    scores = [[(0.0 if ok else -1.0, 1), (-1.0 if ok else 0.0, 1)] for ok in c]
    return dev_scoring.DevResult(scores=scores, cf_scores=None, acc=sum(c) / N_DEV,
                                 acc_norm=sum(c) / N_DEV, counts=[sum(c), N_DEV - sum(c)],
                                 correct=c, seconds=0.0)


class ScriptedDev:
    """Stands in for dev_scoring.score_dev: dev results from a script, in call order."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def __call__(self, model, dev, keys, values):
        self.calls.append([k.clone() for k in keys])
        return fake_result(self.script[len(self.calls) - 1])


def dev_set():
    return dev_scoring.DevSet(plan=None, labels=[0] * N_DEV)


def steps_of(model, tokenizer, candidate, iteration):
    ids = builder.tokenize_demos(tokenizer, DEMOS)
    *_, (it, keys, values) = deep_thinking_steps(
        model, ids, iterations=iteration, optimizer=candidate.optimizer,
        position_mode=candidate.position_mode, **candidate.params)
    return keys, values


def test_grid_is_the_documented_one(tiny_llama_loaded):
    model, _ = tiny_llama_loaded
    grid = search.search_grid(search.position_modes(model.config))
    assert grid[0] == search.PUBLISHED and len(grid) == 14
    names = [c.name for c in grid]
    assert len(set(names)) == 14
    assert {(c.optimizer, tuple(sorted(c.params.items()))) for c in grid} == {
        ("momentum", (("beta", b), ("step_size", s))) for s in (0.01, 0.03) for b in (0.9, 0.0)
    } | {("ema", (("eta", e),)) for e in (0.05, 0.1, 0.2)}
    assert {c.position_mode for c in grid} == {"published", "aligned"}
    from transformers import GPT2Config

    assert search.position_modes(GPT2Config()) == ("published",)


def test_search_bookkeeping(monkeypatch, tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    grid = [search.PUBLISHED, search.Candidate("ema", {"eta": 0.2}),
            search.Candidate("momentum", {"step_size": 0.03, "beta": 0.0})]
    base = set(range(50))
    script = ([base] + [base] * 3                            # published: flat, 4 iterations
              + [set(range(55)), set(range(62)), base]       # ema: best at 3 (62 right)
              + [set(range(62)), set(range(40)), set(range(40))])  # ties ema, later in grid
    fake = ScriptedDev(script)
    monkeypatch.setattr(candidates, "score_dev", fake)
    policy = SelectionPolicy(max_iterations=4, patience=None, collapse_drop=None)
    ids = builder.tokenize_demos(tokenizer, DEMOS)
    seen = []
    runs, icl = candidates.run_candidates(model, ids, grid, dev_set(), policy, progress=False,
                                          on_iteration=lambda r, t, k, v, e, d: seen.append(
                                              (r.candidate.name, t)))
    # iteration 1 is scored once for all candidates
    assert len(fake.calls) == len(script)
    assert [r.iterations_run for r in runs] == [4, 4, 4]
    assert [r.best_iteration for r in runs] == [1, 3, 2]
    assert seen == [(c.name, t) for c in grid for t in range(1, 5)]
    selection = candidates.choose(runs, icl, policy)
    summary = selection.summary
    # ema and momentum tie at 0.62: the earlier candidate in the grid wins
    assert summary["best_run"] == grid[1].name and selection.iteration == 3
    assert candidates.selected_dev_acc(summary) == 0.62 == summary["best_dev_acc"]
    assert summary["guard"]["discordant"] == [0, 12] and summary["guard"]["passed"]
    assert [c["name"] for c in summary["candidates"]] == [c.name for c in grid]
    assert [len(c["trace"]) for c in summary["candidates"]] == [4, 4, 4]
    assert summary["candidates"][1]["trace"][2]["dev_acc"] == 0.62
    # every trace entry carries its discordant pairs against T=1: the guard for any k
    assert summary["candidates"][1]["trace"][2]["dev_vs_t1"] == [0, 12]
    assert summary["candidates"][0]["trace"][0]["dev_vs_t1"] == [0, 0]
    # the kept K/V are the chosen candidate's iterate
    keys, values = steps_of(model, tokenizer, grid[1], 3)
    assert all(torch.equal(a, b) for a, b in zip(selection.keys, keys))
    adapter = builder.adapter_from_selection(model, DEMOS, ids, selection)
    cfg = adapter.config
    assert (cfg.optimizer, cfg.optimizer_params, cfg.selected_iteration) == ("ema", {"eta": 0.2}, 3)
    assert cfg.selection_trace == runs[1].trace and cfg.selection["selected"] == grid[1].name


def test_guard_keeps_plain_icl(monkeypatch, tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    base = set(range(50))
    fake = ScriptedDev([base, set(range(10, 62)), base, base])  # +2 points, noisy
    monkeypatch.setattr(candidates, "score_dev", fake)
    policy = SelectionPolicy(max_iterations=4, min_iterations=1, patience=None,
                             collapse_drop=None)
    ids = builder.tokenize_demos(tokenizer, DEMOS)
    runs, icl = candidates.run_candidates(model, ids, [search.PUBLISHED], dev_set(), policy,
                                          progress=False)
    selection = candidates.choose(runs, icl, policy)
    assert runs[0].best_iteration == 2 and selection.iteration == 1
    assert not selection.summary["guard"]["passed"]
    # the kept iteration's dev accuracy is T=1's, not the best iteration's
    assert selection.summary["best_dev_acc"] == 0.52
    assert candidates.selected_dev_acc(selection.summary) == 0.50
    written_before = {k: v for k, v in selection.summary.items() if k != "selected_dev_acc"}
    assert candidates.selected_dev_acc(written_before) == 0.50
    keys, _ = steps_of(model, tokenizer, search.PUBLISHED, 1)
    assert all(torch.equal(a, b) for a, b in zip(selection.keys, keys))
    relaxed = candidates.choose(runs, icl, SelectionPolicy(guard_k=0.0))
    assert relaxed.iteration == 2


def test_build_adapter_stops_and_records_the_protocol(monkeypatch, tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    base = set(range(50))
    fake = ScriptedDev([base, set(range(60))] + [set(range(55))] * 13)
    monkeypatch.setattr(candidates, "score_dev", fake)
    from vllm_deepthink.tasks.scoring import ChoiceItem

    items = [ChoiceItem("Review: fine\nSentiment:", [" positive", " negative"], 0)] * N_DEV
    adapter = builder.build_adapter(
        model, tokenizer, DEMOS, dev_items=items, progress=False,
        policy=SelectionPolicy(max_iterations=15, min_iterations=8, patience=4))
    cfg = adapter.config
    assert (cfg.iterations_run, cfg.selected_iteration) == (12, 2)
    assert cfg.selection["policy"]["min_iterations"] == 8
    assert cfg.selection["candidates"][0]["stopped"].startswith("patience")


def test_label_calibration_of_a_classification_build(tiny_llama_loaded):
    from vllm_deepthink.tasks import calibration
    from vllm_deepthink.tasks.scoring import ChoiceItem, score_items_hf

    model, tokenizer = tiny_llama_loaded
    labels = [" the", " is"]  # one token each in the tiny tokenizer
    items = [ChoiceItem(q, labels, i % 2) for i, q in enumerate(
        ["Review: a charming film\nSentiment:", "The quick brown fox", "Question: who ?\nType:"])]
    cf = [ChoiceItem("Review: N/A\nSentiment:", labels, 0)]
    adapter = builder.build_adapter(model, tokenizer, DEMOS, iterations=2, dev_items=items,
                                    content_free_items=cf, label_words=["the", "is"],
                                    progress=False)
    cal = adapter.config.label_calibration
    past = adapter.as_past_key_values()
    assert cal["label_token_ids"] == [tokenizer(w, add_special_tokens=False)["input_ids"][0]
                                      for w in labels]
    assert cal["dev-prior"]["log_prior"] == pytest.approx(calibration.log_prior(
        score_items_hf(model, tokenizer, items, past_key_values=past)), abs=1e-6)
    assert cal["content-free"]["log_prior"] == pytest.approx(calibration.log_prior(
        score_items_hf(model, tokenizer, cf, past_key_values=past)), abs=1e-6)
    entry = adapter.config.selection_trace[0]
    assert entry["dev_counts"] and len(entry["cf_log_prior"]) == 2
