"""The rows of the accuracy table, results/results.md (the library of `vllm-deepthink
results`, apps/results.py; apps/results_report.py turns the rows into the report).

One row per (model, task, demo seed), computed with HF transformers in this process
(the builder's library functions, tasks.scoring.score_plan). Demonstrations: the paper's
shot count, fitted to the model (tasks.sample_demos); dev: 300 random train rows
disjoint from them; test: the split the paper used, up to 1000 items drawn with seed 0,
the same items for every seed. Columns:

  zero-shot    the query alone (after BOS)
  icl          the demonstrations' ids before the query (= Deep-Thinking iteration 1)
  icl+cf       ICL, content-free calibrated (Zhao et al. 2021)
  icl+dev      ICL, dev-prior calibrated
  dt           Deep-Thinking, published defaults (momentum 0.01 / 0.9), T chosen on
               dev by the builder's protocol (selection.py: min iterations, patience,
               collapse stop, the guard against T=1)
  dt+cf/+dev   that adapter, calibrated
  dt-search    Deep-Thinking with --search (the grid of search.py, selected on dev)
  dt-oracle    the published-default run with T picked on the TEST split: an upper
               bound comparable to the paper's protocol, never used for a claim

Per row: the paired difference to ICL with a 95% paired-bootstrap interval and the
exact McNemar p-value. Every row JSON keeps the per-choice scores of every column and
the priors, so each calibration can be recomputed offline, and the dev trace of every
candidate plus the test trace of the published-default run.

Checkpoints (`RowCheckpoints`, OUT/work/ROW/): zero-shot.json, icl.json +
icl.safetensors (iteration 1, shared by every candidate), cand-NN.json +
cand-NN.safetensors (each finished search candidate: its trace, dev result and best
K/V), so an interrupted row resumes at its next candidate; cand-NN.partial.json (the
running candidate's dev result and, for the published-default run, test trace at every
iteration scored so far), so a candidate interrupted mid-run (a run longer than a
session: HellaSwag's published-default run with its test trace) resumes after its last
scored iteration, its K/V recomputed by running the optimizer that far (bit-identical
with the same --threads on the same machine; elsewhere, equal to float rounding). Their
names and content are a contract: a row started by an earlier version resumes with
this one. The JSON files are the checkpoint; the .safetensors files only save time:
where one is missing (the JSON files copied or committed to continue a row on another
machine), its K/V are recomputed the same way (replay_kv) and saved again.

Rows are scored with HF, not a vLLM engine: the test trace needs the K/V of every
iteration, which HF scores in memory while vLLM would need one saved adapter per
iteration (the cost comparison: results/README.md, "Accuracy", Scoring). The adapters of
dt and dt-search are saved under the adapters directory for serving.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

ROW_SCHEMA = "vllm-deepthink/results-row/1"
CLASSIFICATION_TASKS = ("sst2", "mr", "trec", "sst5", "agnews")
MC_TASKS = ("copa", "openbookqa", "qasc", "winogrande", "hellaswag")
MODEL_DIRS = {"smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
GEMMA_TASKS = ("sst2", "mr", "trec", "sst5")
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class RowSpec:
    model: str
    task: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}-{self.task}-s{self.seed}"


def default_rows() -> list[RowSpec]:
    """Most important first: SmolLM2 classification over 3 seeds (seed-major, so the
    mean over tasks has every task early; the long AG News last in each seed), then
    Gemma 3 270M, then SmolLM2 on the multiple-choice tasks (1 seed)."""
    rows = [RowSpec("smollm2", t, s) for s in (0, 1, 2) for t in CLASSIFICATION_TASKS]
    rows += [RowSpec("gemma3-270m", t, s) for s in (0, 1, 2) for t in GEMMA_TASKS]
    rows += [RowSpec("smollm2", t, 0) for t in MC_TASKS]
    return rows


@dataclass(frozen=True)
class RowOptions:
    """How rows are computed (apps/results.py fills it from its flags)."""

    data_dir: Path  # holds the built-in task directories
    adapters_dir: Path  # where the dt and dt-search adapters of each row go
    policy: SelectionPolicy  # the selection protocol of every candidate
    limit: int = DEFAULT_LIMIT  # test items per row
    dev_size: int = 300
    batch_size: int = 16  # scoring batch size
    skip_search: bool = False  # every column but dt-search (its grid: the published default)
    progress: bool = True


# ----------------------------------------------------------------- files

def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over `path`
    (a reader never sees half a file; an interrupted write leaves no row behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_kv(path: Path, keys, values) -> None:
    from safetensors.torch import save_file

    tensors = {f"k.{i}": k.contiguous() for i, k in enumerate(keys)}
    tensors.update({f"v.{i}": v.contiguous() for i, v in enumerate(values)})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_kv(path: Path):
    """(keys, values) saved by _save_kv, or (None, None) when the file is missing."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None, None
    tensors = load_file(str(path))
    n = len(tensors) // 2
    return [tensors[f"k.{i}"] for i in range(n)], [tensors[f"v.{i}"] for i in range(n)]


def row_path(out: Path, spec: RowSpec) -> Path:
    return out / "json" / f"{spec.key}.json"


def work_dir(out: Path, spec: RowSpec) -> Path:
    """The row's checkpoints (removed once the row is written, unless --skip-search)."""
    return out / "work" / spec.key


def row_state(out: Path, spec: RowSpec, with_search: bool = True) -> str:
    """"done", "done without search" (a --skip-search row; the full run adds the search
    column from its checkpoints), "partial" or "to do"."""
    path = row_path(out, spec)
    if path.is_file():
        skipped = json.loads(path.read_text()).get("search") == "skipped"
        if not skipped:
            return "done"
        return "partial (no search)" if with_search else "done without search"
    work = work_dir(out, spec)
    return "partial" if work.is_dir() and any(work.iterdir()) else "to do"


class RowCheckpoints:
    """The checkpoints of one row (file names and content: see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load_zero_shot(self) -> list[list[float]] | None:
        path = self.dir / "zero-shot.json"
        return json.loads(path.read_text())["scores"] if path.is_file() else None

    def save_zero_shot(self, scores, seconds: float) -> None:
        write_json_atomic(self.dir / "zero-shot.json",
                          {"scores": [[s for s, _ in i] for i in scores], "seconds": seconds})

    def load_icl(self):
        """Iteration 1 as builder.run_candidates takes it back: (dev result, K, V); K and
        V are None when icl.safetensors is missing (run_grid recomputes them)."""
        from vllm_deepthink.producers.deepthink import builder

        if not (self.dir / "icl.json").is_file():
            return None
        saved = json.loads((self.dir / "icl.json").read_text())
        keys, values = _load_kv(self.dir / "icl.safetensors")
        return builder.DevResult.from_dict(saved["dev"]), keys, values

    def save_icl_once(self, icl) -> None:
        if not (self.dir / "icl.json").is_file():
            self.save_icl_kv(icl[1], icl[2])
            write_json_atomic(self.dir / "icl.json", {"dev": icl[0].to_dict()})

    def load_candidate(self, index: int, candidate):
        """(the finished run, its test trace and trace scores) or None; the run's keys
        and values are None when cand-NN.safetensors is missing (run_grid recomputes
        them)."""
        from vllm_deepthink.producers.deepthink import builder

        path = self.dir / f"cand-{index:02d}.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved["candidate"] != candidate.to_dict():
            return None  # another grid's candidate at this index: run this one
        run = builder.CandidateRun(candidate, trace=saved["trace"], stopped=saved["stopped"],
                                   best_iteration=saved["best_iteration"],
                                   best=builder.DevResult.from_dict(saved["best"]),
                                   seconds=saved["seconds"])
        run.keys, run.values = _load_kv(self.dir / f"cand-{index:02d}.safetensors")
        return run, saved["test_trace"], saved["test_trace_scores"]

    def save_icl_kv(self, keys, values) -> None:
        _save_kv(self.dir / "icl.safetensors", keys, values)

    def save_candidate_kv(self, index: int, run) -> None:
        _save_kv(self.dir / f"cand-{index:02d}.safetensors", run.keys, run.values)

    def save_candidate(self, index: int, run, test_trace, test_trace_scores) -> None:
        self.save_candidate_kv(index, run)
        write_json_atomic(self.dir / f"cand-{index:02d}.json",
                          {"candidate": run.candidate.to_dict(), "trace": run.trace,
                           "stopped": run.stopped, "best_iteration": run.best_iteration,
                           "best": run.best.to_dict(), "seconds": run.seconds,
                           "test_trace": test_trace, "test_trace_scores": test_trace_scores})
        (self.dir / f"cand-{index:02d}.partial.json").unlink(missing_ok=True)

    def load_partial(self, index: int, candidate) -> dict[str, Any]:
        """The scored iterations of an interrupted run of this candidate: {"dev": dev
        results, "test_trace", "test_trace_scores", "seconds"} (empty lists if none)."""
        path = self.dir / f"cand-{index:02d}.partial.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved["candidate"] != candidate.to_dict():
            return {"dev": [], "test_trace": [], "test_trace_scores": [], "seconds": 0.0}
        return saved

    def save_partial(self, index: int, candidate, partial: dict[str, Any]) -> None:
        write_json_atomic(self.dir / f"cand-{index:02d}.partial.json",
                          {"candidate": candidate.to_dict(), **partial})


# ----------------------------------------------------------------- columns

class Deadline(Exception):
    """The time budget ran out; the row's checkpoints stay for the next invocation."""


def _rounded(scores) -> list[list[float]]:
    return [[round(float(s), 5) for s, _ in item] for item in scores]


def _accuracy(preds, labels) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def _column(scores, labels, prior=None, prior_norm=None) -> dict[str, Any]:
    from vllm_deepthink.tasks import calibration, scoring

    if prior is None:
        preds = scoring.predictions(scores)
        preds_norm = scoring.predictions(scores, normalize=True)
    else:
        preds = calibration.calibrated_predictions(scores, prior)
        preds_norm = calibration.calibrated_predictions(scores, prior_norm, normalize=True)
    return {"acc": _accuracy(preds, labels), "acc_norm": _accuracy(preds_norm, labels),
            "predictions": preds}


def _priors(dev_result) -> dict[str, Any] | None:
    """Content-free and dev-prior log-priors (plain and per-token) of one prefix."""
    from vllm_deepthink.tasks import calibration

    if dev_result is None or dev_result.cf_scores is None:
        return None
    return {"content-free": calibration.log_prior(dev_result.cf_scores),
            "content-free_norm": calibration.log_prior(dev_result.cf_scores, normalize=True),
            "dev-prior": calibration.log_prior(dev_result.scores),
            "dev-prior_norm": calibration.log_prior(dev_result.scores, normalize=True)}


def _paired(a_preds, b_preds, labels) -> dict[str, Any]:
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
    return {name: _paired(columns[a]["predictions"], columns[b]["predictions"], labels)
            for name, (a, b) in COMPARISONS.items() if a in columns and b in columns}


# ----------------------------------------------------------------- one row

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
    dev: Any  # builder.DevSet
    test_plan: Any  # scoring.ScoringPlan
    labels: list[int]
    grid: list


def prepare_row(spec: RowSpec, ctx: ModelContext, options: RowOptions) -> RowInputs:
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.deepthink import builder, search
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.tasks import scoring
    from vllm_deepthink.tasks.datasets import open_task

    tok, config = ctx.tokenizer, ctx.model.config
    task = open_task(Path(options.data_dir) / spec.task)  # jsonl files or a task.json dataset
    inputs = task_build_inputs(task, tok, config, seed=spec.seed, dev_size=options.dev_size)
    dev = builder.DevSet.from_items(tok, inputs.dev_items, inputs.content_free_items,
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

    from vllm_deepthink.producers.deepthink import builder
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
    scored = [builder.DevResult.from_dict(d) for d in partial["dev"]]
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
            trace_scores.append(_rounded(scores))
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
        (run,), icl = builder.run_candidates(model, row.build.demo_ids, [candidate], row.dev,
                                             options.policy, progress=options.progress,
                                             on_iteration=on_iteration, icl=icl, scored=scored)
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

    from vllm_deepthink.producers.deepthink import builder

    wanted, kv = set(iterations), {}
    with torch.inference_mode():
        for iteration, keys, values in builder.deep_thinking_steps(
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

    from vllm_deepthink.producers.deepthink import builder

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
        icl_dev = builder.score_dev(model, row.dev, *icl_kv)
        best_dev = icl_dev if best == 1 else builder.score_dev(model, row.dev, *best_kv)
    checkpoints.save_icl_once((icl_dev, *icl_kv))
    run = builder.CandidateRun(candidate, trace=published["trace"], stopped=published["stopped"],
                               best_iteration=best, best=best_dev, keys=best_kv[0],
                               values=best_kv[1], seconds=published["seconds"])
    checkpoints.save_candidate(0, run, first_pass["test_trace"],
                               first_pass["test_trace_scores"])


@dataclass
class Selected:
    """The dt, dt-search and dt-oracle choices and the test scores of the columns
    icl, dt, dt-search and dt-oracle."""

    default: Any  # builder.Selection
    searched: Any  # builder.Selection
    oracle_iteration: int
    tests: dict[str, Any]


def select_columns(grid: GridRuns, policy: SelectionPolicy, scorer: RowScorer,
                   seconds: dict[str, float]) -> Selected:
    """dt (the published default's run), dt-search (the whole grid), both selected on
    dev, and dt-oracle (T picked on the test trace), with their test scores."""
    import torch

    from vllm_deepthink.producers.deepthink import builder

    runs, trace, trace_scores = grid.runs, grid.test_trace, grid.test_trace_scores
    default = builder.choose(runs[:1], grid.icl, policy)
    searched = builder.choose(runs, grid.icl, policy)
    icl_test = scorer.with_lengths(trace_scores[0])
    if searched.iteration == 1:
        search_test = icl_test
    elif searched.run is runs[0]:
        search_test = scorer.with_lengths(trace_scores[searched.iteration - 1])
    else:
        t = time.perf_counter()
        with torch.inference_mode():
            search_test = scorer.score(searched.keys, searched.values)
        seconds["dt-search test"] = time.perf_counter() - t
    oracle = max(range(len(trace)), key=lambda i: (trace[i]["test_acc"], -i)) + 1
    tests = {"icl": icl_test, "dt": scorer.with_lengths(trace_scores[default.iteration - 1]),
             "dt-search": search_test,
             "dt-oracle": scorer.with_lengths(trace_scores[oracle - 1])}
    return Selected(default, searched, oracle, tests)


def save_adapters(spec: RowSpec, ctx: ModelContext, row: RowInputs, options: RowOptions,
                  selected: Selected) -> dict[str, str]:
    """The adapters of dt and dt-search, for serving: column -> directory."""
    from vllm_deepthink.producers.deepthink import builder

    selections = [("dt", selected.default)]
    if not options.skip_search:
        selections.append(("dt-search", selected.searched))
    saved = {}
    for name, selection in selections:
        adapter = builder.adapter_from_selection(
            ctx.model, row.build.demos_text, row.build.demo_ids, selection, dev=row.dev,
            label_words=row.build.label_words, task=row.build.info,
            build_args={"results_row": spec.key, "column": name},
            base_model_name_or_path=str(ctx.dir.resolve()))
        directory = Path(options.adapters_dir) / f"{spec.key}-{name}"
        adapter.save_pretrained(directory)
        saved[name] = str(directory)
    return saved


def row_settings(ctx: ModelContext, options: RowOptions, row: RowInputs) -> dict[str, Any]:
    import torch

    return {"model_dir": str(ctx.dir), "task": row.task.to_dict(),
            "split": row.task.eval_split, "limit": options.limit, "n_test": len(row.labels),
            "dev_size": row.dev.size, "policy": options.policy.to_dict(),
            "grid": [c.to_dict() for c in row.grid], "engine": "hf",
            "threads": torch.get_num_threads()}


def assemble_row(spec: RowSpec, ctx: ModelContext, options: RowOptions, row: RowInputs,
                 zero_shot, grid: GridRuns, selected: Selected, adapters: dict[str, str],
                 seconds: dict[str, float]) -> dict[str, Any]:
    """The row JSON (schema ROW_SCHEMA)."""
    skip = options.skip_search
    priors = {"icl": _priors(grid.icl[0]), "dt": _priors(selected.default.dev),
              "dt-search": _priors(selected.searched.dev)}
    columns = row_columns(zero_shot, selected.tests, row.labels, priors, skip)
    scores = {"zero-shot": _rounded(zero_shot)}
    scores.update({name: _rounded(selected.tests[name])
                   for name in ("icl", "dt", "dt-search", "dt-oracle")
                   if not (skip and name == "dt-search")})
    selection = {"dt": selected.default.summary, "dt-search": selected.searched.summary,
                 "dt-oracle": {"iteration": selected.oracle_iteration,
                               "note": "T picked on the test split: an upper bound, "
                                       "never a claim"}}
    if skip:
        del selection["dt-search"]
    build = row.build
    return {
        "schema": ROW_SCHEMA,
        "search": "skipped" if skip else "run",
        "row": {"model": spec.model, "task": spec.task, "seed": spec.seed, "key": spec.key},
        "settings": row_settings(ctx, options, row),
        "demos": {"prefix_len": len(build.demo_ids),
                  "shots_per_class": build.info["shots_per_class"],
                  "indices": build.info["demo_indices"], "fit": build.demos.fit},
        "labels": row.labels,
        "choice_tokens": row.test_plan.choice_lengths,
        "scores": scores,
        "priors": priors,
        "columns": columns,
        "paired": paired_comparisons(columns, row.labels),
        "selection": selection,
        "test_trace": grid.test_trace,
        "test_trace_scores": grid.test_trace_scores,
        "adapters": adapters,
        "seconds": seconds,
    }


def compute_row(spec: RowSpec, ctx: ModelContext, options: RowOptions, out: Path,
                deadline: float | None = None, now: Callable[[], float] = time.time
                ) -> dict[str, Any]:
    """Compute (or resume from OUT/work/ROW/) one row; raises Deadline between candidates
    or iterations once `now()` is past `deadline`."""
    started = time.perf_counter()
    checkpoints = RowCheckpoints(work_dir(out, spec))
    row = prepare_row(spec, ctx, options)
    scorer = RowScorer(ctx.model, row.test_plan, options.batch_size)
    first_pass = row_path(out, spec)
    if (not options.skip_search and first_pass.is_file()
            and checkpoints.load_candidate(0, row.grid[0]) is None):
        data = json.loads(first_pass.read_text())
        if data.get("search") == "skipped":
            restore_first_pass(checkpoints, data, ctx.model, row, scorer)
    seconds: dict[str, float] = {}
    zero_shot = zero_shot_scores(checkpoints, scorer, ctx.tokenizer, seconds)
    grid = run_grid(spec, ctx.model, row, options, checkpoints, scorer, deadline, now)
    selected = select_columns(grid, options.policy, scorer, seconds)
    adapters = save_adapters(spec, ctx, row, options, selected)
    seconds["search candidates"] = sum(r.seconds for r in grid.runs)
    seconds["published candidate"] = grid.runs[0].seconds
    seconds["test trace"] = sum(e["test_seconds"] for e in grid.test_trace)
    seconds["row (this invocation)"] = time.perf_counter() - started
    return assemble_row(spec, ctx, options, row, zero_shot, grid, selected, adapters, seconds)
