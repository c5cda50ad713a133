"""The runs of a results row: its inputs (`prepare_row`: task, demonstrations, dev set,
test plan, candidate grid), the zero-shot scores, and every search candidate run with
the builder's library functions and scored with HF in this process
(tasks.scoring.score_plan), each checkpointed (checkpoints.py) so an interrupted row
resumes where its scoring stopped.

Demonstrations: the paper's shot count, fitted to the model (tasks.sample_demos); dev:
random train rows disjoint from them; test: the split the paper used, up to
`RowOptions.limit` items drawn with seed 0, the same items for every seed. Rows are
scored with HF rather than through vLLM: results/README.md gives the measured reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.results.checkpoints import RowCheckpoints
from vllm_deepthink.apps.results.columns import rounded_scores
from vllm_deepthink.apps.results.specs import RowOptions, RowSpec


class Deadline(Exception):
    """The time budget ran out; the row's checkpoints stay for the next invocation."""


class ModelContext:
    """A model and its tokenizer, loaded once for all rows of that model."""

    def __init__(self, name: str, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.dir = name, model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          local_files_only=True).eval()


@dataclass
class RowInputs:
    """What a row works on: the task, the build inputs (demonstrations, dev and
    content-free items), the dev set, the test plan and labels, the candidate grid."""

    task: Any
    build: Any  # from_task.TaskBuildInputs
    dev: Any  # dev_scoring.DevSet
    test_plan: Any  # scoring.ScoringPlan
    labels: list[int]
    grid: list


def prepare_row(spec: RowSpec, ctx: ModelContext, options: RowOptions) -> RowInputs:
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.deepthink import search
    from vllm_deepthink.producers.deepthink.dev_scoring import DevSet
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.tasks import scoring
    from vllm_deepthink.tasks.datasets import open_task

    tok, config = ctx.tokenizer, ctx.model.config
    task = open_task(Path(options.data_dir) / spec.task)  # jsonl files or a task.json dataset
    inputs = task_build_inputs(task, tok, config, seed=spec.seed, dev_size=options.dev_size)
    dev = DevSet.from_items(tok, inputs.dev_items, inputs.content_free_items,
                            options.batch_size)
    test_rows = tasks.eval_rows(task, task.eval_split, options.limit, seed=0)
    test_items = scoring.items_from_rows(task, test_rows)
    test_plan = scoring.make_plan(scoring.encode_items(tok, test_items))
    grid = search.search_grid(search.position_modes(config))
    assert grid[0] == search.PUBLISHED
    if options.skip_search:
        grid = grid[:1]  # the published default only; a later run adds the others
    return RowInputs(task, inputs, dev, test_plan, [i.label for i in test_items], grid)


class RowScorer:
    """The row's test items scored after a prefix (K/V or ids)."""

    def __init__(self, model, plan, batch_size: int):
        self.model, self.plan, self.batch_size = model, plan, batch_size

    def score(self, keys=None, values=None, prefix_ids=None):
        from vllm_deepthink.tasks import scoring

        past = None if keys is None else list(zip(keys, values))
        return scoring.score_plan(self.model, self.plan, past_key_values=past,
                                  prefix_ids=prefix_ids, batch_size=self.batch_size)

    def with_lengths(self, rows):
        """Saved per-choice scores back as (score, choice tokens) pairs."""
        return [[(float(s), n) for s, n in zip(r, lengths)]
                for r, lengths in zip(rows, self.plan.choice_lengths)]


def zero_shot_scores(checkpoints: RowCheckpoints, scorer: RowScorer, tokenizer,
                     seconds: dict[str, float]):
    """The query after the tokenizer's special prefix (BOS), checkpointed."""
    import torch

    saved = checkpoints.load_zero_shot()
    if saved is not None:
        return scorer.with_lengths(saved)
    t = time.perf_counter()
    with torch.inference_mode():
        scores = scorer.score(prefix_ids=list(tokenizer("")["input_ids"]))
    seconds["zero-shot"] = time.perf_counter() - t
    checkpoints.save_zero_shot(scores, seconds["zero-shot"])
    return scores


@dataclass
class GridRuns:
    """Every candidate's run, iteration 1 (ICL) and the published-default run's test
    trace (test accuracy at every iteration, and the scores behind it)."""

    runs: list
    icl: tuple
    test_trace: list[dict[str, Any]]
    test_trace_scores: list[list[list[float]]]


def run_candidate(model, row: RowInputs, options: RowOptions, candidate, icl,
                  scorer: RowScorer, record_test: bool,
                  checkpoints: RowCheckpoints | None = None, index: int = 0,
                  deadline: float | None = None, now: Callable[[], float] = time.time):
    """One candidate's run; with `record_test`, the test accuracy at every iteration.
    With `checkpoints`, every scored iteration is checkpointed (cand-NN.partial.json),
    a run interrupted earlier resumes after its last scored iteration, and Deadline is
    raised after a checkpointed iteration once `now()` is past `deadline`.
    Returns (run, icl, test trace, test trace scores)."""
    import torch

    from vllm_deepthink.producers.deepthink import candidates, dev_scoring
    from vllm_deepthink.tasks import scoring

    partial = (checkpoints.load_partial(index, candidate) if checkpoints is not None else
               {"dev": [], "test_trace": [], "test_trace_scores": [], "seconds": 0.0})
    # save_partial writes an iteration's dev result and test trace together
    if record_test and not len(partial["dev"]) == len(partial["test_trace"]) == len(
            partial["test_trace_scores"]):
        raise ValueError(
            f"{checkpoints.dir / f'cand-{index:02d}.partial.json'}: expected as many test "
            f"trace entries as dev results, found {len(partial['dev'])} dev results, "
            f"{len(partial['test_trace'])} test trace entries and "
            f"{len(partial['test_trace_scores'])} test trace scores; delete the file to "
            f"run this candidate again")
    scored = [dev_scoring.DevResult.from_dict(d) for d in partial["dev"]]
    trace_rows: list[dict[str, Any]] = list(partial["test_trace"])
    trace_scores: list[list[list[float]]] = list(partial["test_trace_scores"])
    before, started = partial["seconds"], time.perf_counter()

    def on_iteration(run, iteration, keys, values, entry, result):
        if iteration <= len(scored):
            return  # scored before the interruption
        if record_test:
            t = time.perf_counter()
            scores = scorer.score(keys, values)
            counts = [0] * max(len(s) for s in scores)
            for p in scoring.predictions(scores):
                counts[p] += 1
            metrics = scoring.accuracy(scores, row.labels)
            trace_rows.append({"iteration": iteration, "test_acc": metrics["acc"],
                               "test_acc_norm": metrics["acc_norm"], "test_counts": counts,
                               "test_seconds": time.perf_counter() - t})
            trace_scores.append(rounded_scores(scores))
        if checkpoints is not None and result is not None:
            partial["dev"].append(result.to_dict())
            partial.update(test_trace=trace_rows, test_trace_scores=trace_scores,
                           seconds=before + time.perf_counter() - started)
            checkpoints.save_partial(index, candidate, partial)
            if deadline is not None and now() > deadline:
                raise Deadline(f"time budget reached after iteration {iteration} of "
                               f"{candidate.name}; its {iteration} scored iterations are "
                               f"checkpointed")

    with torch.inference_mode():
        (run,), icl = candidates.run_candidates(model, row.build.demo_ids, [candidate],
                                                row.dev, options.policy,
                                                progress=options.progress,
                                                on_iteration=on_iteration, icl=icl,
                                                scored=scored)
    run.seconds += before  # the interrupted invocations' share
    return run, icl, trace_rows, trace_scores


def run_grid(spec: RowSpec, model, row: RowInputs, options: RowOptions,
             checkpoints: RowCheckpoints, scorer: RowScorer, deadline: float | None,
             now: Callable[[], float]) -> GridRuns:
    """Every candidate of the grid, from its checkpoint or run (then checkpointed);
    raises Deadline before a candidate, or after an iteration of one, once `now()` is
    past `deadline`."""
    icl = checkpoints.load_icl()
    if icl is not None and icl[1] is None:  # iteration 1: the same for every candidate
        icl = (icl[0], *replay_kv(model, row, row.grid[0], [1])[1])
        checkpoints.save_icl_kv(icl[1], icl[2])
    runs, test_trace, test_trace_scores = [], [], []
    for index, candidate in enumerate(row.grid):
        saved = checkpoints.load_candidate(index, candidate)
        if saved is not None and saved[0].keys is None:
            best = saved[0].best_iteration
            saved[0].keys, saved[0].values = replay_kv(model, row, candidate, [best])[best]
            checkpoints.save_candidate_kv(index, saved[0])
        if saved is None:
            if deadline is not None and now() > deadline:
                raise Deadline(f"{spec.key}: time budget reached before candidate {index} "
                               f"({candidate.name}); {index} of {len(row.grid)} are "
                               f"checkpointed")
            try:
                run, icl, trace, trace_scores = run_candidate(
                    model, row, options, candidate, icl, scorer, record_test=index == 0,
                    checkpoints=checkpoints, index=index, deadline=deadline, now=now)
            except Deadline as exc:
                raise Deadline(f"{spec.key}: {exc}") from None
            checkpoints.save_icl_once(icl)
            checkpoints.save_candidate(index, run, trace if index == 0 else None,
                                       trace_scores if index == 0 else None)
            if options.progress:
                print(f"[results] {spec.key}: {candidate.name} best iteration "
                      f"{run.best_iteration} dev {run.best_dev_acc:.4f} ({run.stopped}; "
                      f"{run.seconds:.0f} s)", flush=True)
            saved = run, trace, trace_scores
        if index == 0:
            test_trace, test_trace_scores = saved[1], saved[2]
        runs.append(saved[0])
    return GridRuns(runs, icl, test_trace, test_trace_scores)


def replay_kv(model, row: RowInputs, candidate, iterations) -> dict[int, tuple[list, list]]:
    """The K/V (per layer [kv_heads, L, head_dim]) of `candidate` at each of `iterations`,
    by running its optimizer that far without scoring: one forward over the
    demonstrations per iteration, bit-identical to the checkpointed run with the same
    --threads on the same machine (elsewhere, equal to float rounding)."""
    import torch

    from vllm_deepthink.producers.deepthink.iteration import deep_thinking_steps

    wanted, kv = set(iterations), {}
    with torch.inference_mode():
        for iteration, keys, values in deep_thinking_steps(
                model, row.build.demo_ids, iterations=max(wanted),
                optimizer=candidate.optimizer, position_mode=candidate.position_mode,
                **candidate.params):
            if iteration in wanted:
                kv[iteration] = ([k.clone() for k in keys], [v.clone() for v in values])
    return kv


def restore_first_pass(checkpoints: RowCheckpoints, first_pass: dict[str, Any], model,
                       row: RowInputs, scorer: RowScorer) -> None:
    """Rebuild the checkpoints of zero-shot, ICL and the published-default candidate
    from a --skip-search row JSON (e.g. committed by an earlier session), so that adding
    the search column does not run that candidate and its test trace again: the scores
    and traces come from the JSON, the K/V of its best iteration from running the
    optimizer that far (no scoring), and the dev results of iterations 1 and best from
    one dev pass each. The zero-shot scores are the JSON's (rounded to 1e-5)."""
    import torch

    from vllm_deepthink.producers.deepthink import candidates, dev_scoring

    published = first_pass["selection"]["dt"]["candidates"][0]
    candidate = row.grid[0]
    if published["name"] != candidate.name:
        return  # another grid: compute it again
    if checkpoints.load_zero_shot() is None:
        checkpoints.save_zero_shot(scorer.with_lengths(first_pass["scores"]["zero-shot"]),
                                   0.0)
    best = published["best_iteration"]
    kv = replay_kv(model, row, candidate, [1, best])
    icl_kv, best_kv = kv[1], kv[best]
    with torch.inference_mode():
        icl_dev = dev_scoring.score_dev(model, row.dev, *icl_kv)
        best_dev = icl_dev if best == 1 else dev_scoring.score_dev(model, row.dev, *best_kv)
    checkpoints.save_icl_once((icl_dev, *icl_kv))
    run = candidates.CandidateRun(candidate, trace=published["trace"],
                                  stopped=published["stopped"], best_iteration=best,
                                  best=best_dev, keys=best_kv[0], values=best_kv[1],
                                  seconds=published["seconds"])
    checkpoints.save_candidate(0, run, first_pass["test_trace"],
                               first_pass["test_trace_scores"])

