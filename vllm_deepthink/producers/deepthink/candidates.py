"""Candidate runs and the choice between them.

A build runs one candidate (optimizer, parameters, position mode) or a grid of them
(search.py), scores every iteration on a dev split (dev_scoring.py), stops each run by
the rules of selection.py and keeps the dev-selected iteration. The cost of a build is
its dev passes: one per candidate per iteration, iteration 1 (plain ICL, shared by all
candidates) once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_deepthink.producers.deepthink.dev_scoring import DevResult, DevSet, score_dev
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.iteration import (check_build_supported,
                                                          deep_thinking_steps, optimizer_params)
from vllm_deepthink.producers.deepthink.search import Candidate
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy, StopRule, guard
from vllm_deepthink.tasks import stats


@dataclass
class CandidateRun:
    """One candidate's run: its trace, why it stopped and its best iteration's K/V and
    dev result (the last iteration's when there is no dev split)."""

    candidate: Candidate
    trace: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    best_iteration: int = 1
    best: DevResult | None = None
    keys: list[torch.Tensor] = field(default_factory=list, repr=False)
    values: list[torch.Tensor] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def iterations_run(self) -> int:
        return len(self.trace)

    @property
    def best_dev_acc(self) -> float | None:
        return None if self.best is None else self.best.acc

    def summary(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "iterations_run": self.iterations_run,
                "best_iteration": self.best_iteration, "best_dev_acc": self.best_dev_acc,
                "stopped": self.stopped, "seconds": self.seconds, "trace": self.trace}


@dataclass
class Selection:
    """What a build keeps: the run, the iteration, the guard's numbers."""

    run: CandidateRun
    iteration: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    dev: DevResult | None
    summary: dict[str, Any]


def _check_finite(iteration: int, keys, values) -> None:
    for name, tensors in (("keys", keys), ("values", values)):
        if not all(torch.isfinite(t).all() for t in tensors):
            raise BuildError(
                f"iteration {iteration}: {name} contain NaN/Inf; the build diverged. Use a "
                f"smaller step size / eta, fewer iterations, or `dtype` float32.")


def run_candidates(model, demo_ids: Sequence[int], candidates: Sequence[Candidate],
                   dev: DevSet | None, policy: SelectionPolicy, *, progress: bool = True,
                   on_iteration: Callable[[CandidateRun, int, list, list, dict,
                                           DevResult | None], None] | None = None,
                   icl: tuple[DevResult | None, list, list] | None = None,
                   scored: Sequence[DevResult] = ()
                   ) -> tuple[list[CandidateRun], tuple[DevResult | None, list, list]]:
    """Run every candidate, each stopped by the policy's rules (StopRule) when there is
    a dev split, else run to max_iterations. Returns the runs and iteration 1's (dev
    result, keys, values): plain ICL, computed and scored once for all candidates
    (`icl`: that triple from an earlier call, e.g. when candidates run one at a time).

    `scored`: the dev results of the first iterations of the only candidate, from an
    interrupted run of it. Those iterations are run again (the K/V, which cost one
    forward over the demonstrations each) but not scored again, so the run resumes
    where its dev scoring stopped with the same trace and stopping decisions.

    on_iteration(run, iteration, keys, values, trace_entry, dev_result) is called after
    each iteration is scored (keys/values: per layer [kv_heads, L, head_dim]).
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise BuildError("no candidates to run")
    if dev is None and len(candidates) > 1:
        raise BuildError("a search over several candidates needs a dev split to select on")
    if scored and (dev is None or len(candidates) > 1):
        raise BuildError("resuming from scored iterations needs a dev split and one candidate")
    for c in candidates:
        optimizer_params(c.optimizer, **c.params)  # raises on a bad optimizer
        check_build_supported(model.config, len(demo_ids), c.position_mode)
    runs = []
    for candidate in candidates:
        run = CandidateRun(candidate)
        rule = StopRule(policy)
        start = time.perf_counter()
        steps = deep_thinking_steps(model, demo_ids, iterations=policy.max_iterations,
                                    optimizer=candidate.optimizer,
                                    position_mode=candidate.position_mode, **candidate.params)
        bar = tqdm(steps, total=policy.max_iterations, desc=candidate.name, unit="it",
                   disable=not progress, leave=False)
        try:
            for iteration, keys, values in bar:
                _check_finite(iteration, keys, values)
                if dev is None:
                    result = None
                elif iteration == 1 and icl is not None:
                    result = icl[0]  # the same plain forward for every candidate
                elif iteration <= len(scored):
                    result = scored[iteration - 1]
                else:
                    result = score_dev(model, dev, keys, values)
                if iteration == 1 and icl is None:
                    icl = (result, keys, values)
                entry = (result.trace_entry(iteration) if result is not None else
                         {"iteration": iteration, "dev_acc": None, "dev_acc_norm": None})
                if result is not None:
                    # [only T=1 right, only this iteration right]: the guard, for any k
                    entry["dev_vs_t1"] = list(stats.paired_counts(icl[0].correct,
                                                                  result.correct))
                run.trace.append(entry)
                if result is None or rule.best_iteration is None or result.acc > rule.best_acc:
                    run.best_iteration, run.best, run.keys, run.values = (iteration, result,
                                                                          keys, values)
                if on_iteration is not None:
                    on_iteration(run, iteration, keys, values, entry, result)
                if result is None:
                    stop = "max_iterations" if iteration >= policy.max_iterations else None
                else:
                    stop = rule.update(iteration, result.acc)
                    bar.set_postfix(dev_acc=f"{result.acc:.4f}", best=rule.best_iteration)
                if stop is not None:
                    run.stopped = stop
                    break
        finally:
            steps.close()
        run.seconds = time.perf_counter() - start
        runs.append(run)
    return runs, icl


def choose(runs: Sequence[CandidateRun], icl: tuple[DevResult | None, list, list],
           policy: SelectionPolicy) -> Selection:
    """The best run (highest best dev accuracy, ties to the first), kept only if it
    passes the guard against T=1; else T=1 (plain ICL). Without dev: the last
    iteration of the only run."""
    icl_dev, icl_keys, icl_values = icl
    if icl_dev is None:
        (run,) = runs
        return Selection(run, run.iterations_run, run.keys, run.values, None,
                         {"select_on": "none", "selected": run.candidate.name})
    best_index = max(range(len(runs)), key=lambda i: (runs[i].best_dev_acc, -i))
    run = runs[best_index]
    check = guard(icl_dev.correct, run.best.correct, policy.guard_k)
    summary = {"select_on": "dev", "policy": policy.to_dict(), "dev_size": len(icl_dev.correct),
               "t1_dev_acc": icl_dev.acc, "best_run": run.candidate.name,
               "best_iteration": run.best_iteration, "best_dev_acc": run.best_dev_acc,
               "guard": check}
    if run.best_iteration > 1 and check["passed"]:
        selection = Selection(run, run.best_iteration, run.keys, run.values, run.best, summary)
    else:
        selection = Selection(run, 1, icl_keys, icl_values, icl_dev, summary)
    summary["selected"] = run.candidate.name
    summary["selected_iteration"] = selection.iteration
    summary["selected_dev_acc"] = selection.dev.acc if selection.dev is not None else None
    summary["candidates"] = [r.summary() for r in runs]
    return selection


def selected_dev_acc(summary: dict[str, Any]) -> float | None:
    """The dev accuracy of the iteration a selection summary (choose()) kept. Not
    best_dev_acc: when the guard fails, the kept iteration is T=1, scored t1_dev_acc.
    Summaries written before selected_dev_acc was recorded are read the same way."""
    if "selected_dev_acc" in summary:
        return summary["selected_dev_acc"]
    if summary.get("select_on") != "dev":
        return None
    return (summary["t1_dev_acc"] if summary["selected_iteration"] == 1
            else summary["best_dev_acc"])
