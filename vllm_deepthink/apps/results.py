"""`vllm-deepthink results`: the accuracy table of the README, resumable.

One row per (model, task, demo seed), computed with HF transformers in this process
(the builder's library functions, tasks.scoring.score_plan) and written atomically
to OUT/json/MODEL-TASK-sSEED.json; a row whose JSON exists is never recomputed.
Inside a row, every finished search candidate is checkpointed under OUT/work/ROW/
(its trace, dev result and best K/V), so an interrupted row resumes at the next
candidate. `--time-budget` / `--max-rows` stop cleanly between candidates; run again
to continue. OUT/results.md and OUT/curves.png are regenerated from every row JSON
at the end of each invocation (`--report-only`: only that).

Per row (demonstrations: the paper's shot count, fitted to the model, tasks.sample_demos;
dev: 300 random train rows disjoint from them; test: the split the paper used, up to
1000 items drawn with seed 0, the same items for every seed):

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
exact McNemar p-value; over all (task, seed) pairs of a model: the mean gain with a
95% bootstrap interval over the pairs (apps/results_report.py). Every JSON keeps the
per-choice scores of every column and the priors, so each calibration can be
recomputed offline, and the dev trace of every candidate plus the test trace of the
published-default run.

Measured (README, "Results"): scoring through HF in this process costs about what a
vLLM engine costs per item on this CPU and needs no saved adapter per iteration for
the test trace, so rows are scored with HF; the adapters of dt and dt-search are
saved under --adapters-dir for serving.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROW_SCHEMA = "vllm-deepthink/results-row/1"
CLASSIFICATION_TASKS = ("sst2", "mr", "trec", "sst5", "agnews")
MC_TASKS = ("copa", "openbookqa", "qasc", "winogrande", "hellaswag")
MODEL_DIRS = {"smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
GEMMA_TASKS = ("sst2", "mr", "trec", "sst5")
DEFAULT_LIMIT = 1000


def _now() -> float:
    """Wall-clock time of the time budget (one place, so tests can move it)."""
    return time.time()


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


def select_rows(patterns: str | None) -> list[RowSpec]:
    rows = default_rows()
    if not patterns:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in rows if any(fnmatch.fnmatch(r.key, p) for p in wanted)]
    known = {r.key for r in rows}
    extra = []
    for p in wanted:  # an exact key outside the default table: MODEL-TASK-sSEED
        if any(c in p for c in "*?[") or p in known:
            continue
        name, _, seed = p.rpartition("-s")
        model = next((m for m in MODEL_DIRS if name.startswith(m + "-")), None)
        if model is None or not seed.isdigit():
            raise SystemExit(f"--rows: {p!r} is neither a pattern of the default rows nor "
                             f"MODEL-TASK-sSEED with MODEL in {sorted(MODEL_DIRS)}")
        extra.append(RowSpec(model, name[len(model) + 1:], int(seed)))
    if not chosen and not extra:
        raise SystemExit(f"--rows {patterns!r} matches none of the default rows "
                         f"({', '.join(r.key for r in rows[:3])}, ...)")
    return chosen + extra


def parse_duration(text: str | None) -> float | None:
    """'7200', '90m', '2h', '1h30m' -> seconds."""
    if text is None:
        return None
    import re

    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?",
                         text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise SystemExit(f"--time-budget {text!r}: expected seconds or a duration like 2h, "
                         f"90m, 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    defaults = SelectionPolicy()
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument("--data-dir", default="../shared/data",
                        help="directory holding the built-in task directories")
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--models-dir", default="models", help="where converted models live")
    parser.add_argument("--model-path", action="append", default=[], metavar="NAME=DIR",
                        help="use this HF directory for model NAME (no conversion); repeatable")
    parser.add_argument("--adapters-dir", default="adapters_store/results",
                        help="where the dt and dt-search adapters of each row go")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row keys or patterns (MODEL-TASK-sSEED, e.g. "
                             "'smollm2-*-s0'); default: the whole table, in priority order")
    parser.add_argument("--list", action="store_true",
                        help="print the rows and their state (done / partial / to do) and exit")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help=f"test items per row (default {DEFAULT_LIMIT}; fewer if the split "
                             "is smaller)")
    parser.add_argument("--dev-size", type=int, default=300, help="dev rows per build")
    parser.add_argument("--iterations", type=int, default=defaults.max_iterations,
                        help="maximum T of every run")
    parser.add_argument("--min-iterations", type=int, default=defaults.min_iterations)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--guard-k", type=float, default=defaults.guard_k)
    parser.add_argument("--time-budget", default=None,
                        help="stop cleanly (between search candidates) after this long, e.g. "
                             "2h; run again to continue")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="compute at most this many new rows, then stop")
    parser.add_argument("--skip-search", action="store_true",
                        help="every column but DT search (its grid is most of a row's cost), "
                             "so a first pass covers every row; a later run without this flag "
                             "adds the search column from the row's checkpoints")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=16, help="scoring batch size")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate results.md and curves.png from the row JSONs")
    parser.add_argument("--no-progress", action="store_true")


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
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    n = len(tensors) // 2
    return [tensors[f"k.{i}"] for i in range(n)], [tensors[f"v.{i}"] for i in range(n)]


def row_path(out: Path, spec: RowSpec) -> Path:
    return out / "json" / f"{spec.key}.json"


def row_state(out: Path, spec: RowSpec, with_search: bool = True) -> str:
    """"done", "done without search" (a --skip-search row; the full run adds the search
    column from its checkpoints), "partial" or "to do"."""
    path = row_path(out, spec)
    if path.is_file():
        skipped = json.loads(path.read_text()).get("search") == "skipped"
        if not skipped:
            return "done"
        return "partial (no search)" if with_search else "done without search"
    work = out / "work" / spec.key
    return "partial" if work.is_dir() and any(work.iterdir()) else "to do"


# ----------------------------------------------------------------- one row

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


class ModelContext:
    """A model and its tokenizer, loaded once for all rows of that model."""

    def __init__(self, name: str, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.dir = name, model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          local_files_only=True).eval()


def compute_row(spec: RowSpec, ctx: ModelContext, args, out: Path, deadline: float | None
                ) -> dict[str, Any]:
    """Compute (or resume) one row; raises Deadline between candidates when out of time."""
    import torch

    from vllm_deepthink import tasks
    from vllm_deepthink.producers.deepthink import builder, search
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
    from vllm_deepthink.tasks import scoring

    started = time.perf_counter()
    work = out / "work" / spec.key
    work.mkdir(parents=True, exist_ok=True)
    model, tok = ctx.model, ctx.tokenizer
    task = tasks.load_task(Path(args.data_dir) / spec.task)
    inputs = task_build_inputs(task, tok, model.config, seed=spec.seed, dev_size=args.dev_size)
    dev = builder.DevSet.from_items(tok, inputs.dev_items, inputs.content_free_items,
                                    args.batch_size)
    test_rows = tasks.eval_rows(task, task.eval_split, args.limit, seed=0)
    test_items = scoring.items_from_rows(task, test_rows)
    test_plan = scoring.make_plan(scoring.encode_items(tok, test_items))
    labels = [i.label for i in test_items]
    policy = SelectionPolicy(max_iterations=args.iterations, min_iterations=args.min_iterations,
                             patience=args.patience or None, guard_k=args.guard_k)
    grid = search.search_grid(search.position_modes(model.config))
    assert grid[0] == search.PUBLISHED
    if args.skip_search:
        grid = grid[:1]  # the published default only; a later run adds the others
    progress = not args.no_progress

    def score_test(keys=None, values=None, prefix_ids=None):
        past = None if keys is None else list(zip(keys, values))
        return scoring.score_plan(model, test_plan, past_key_values=past,
                                  prefix_ids=prefix_ids, batch_size=args.batch_size)

    def pair_scores(rows):
        return [[(float(s), n) for s, n in zip(r, lengths)]
                for r, lengths in zip(rows, test_plan.choice_lengths)]

    seconds: dict[str, float] = {}
    # zero-shot: the query after the tokenizer's special prefix (BOS)
    zs_path = work / "zero-shot.json"
    if zs_path.is_file():
        zero_shot = pair_scores(json.loads(zs_path.read_text())["scores"])
    else:
        t = time.perf_counter()
        with torch.inference_mode():
            zero_shot = score_test(prefix_ids=list(tok("")["input_ids"]))
        seconds["zero-shot"] = time.perf_counter() - t
        write_json_atomic(zs_path, {"scores": [[s for s, _ in i] for i in zero_shot],
                                    "seconds": seconds["zero-shot"]})

    # iteration 1 (ICL), shared by every candidate
    icl_path = work / "icl.json"
    if icl_path.is_file():
        saved = json.loads(icl_path.read_text())
        icl_dev = builder.DevResult.from_dict(saved["dev"])
        icl_keys, icl_values = _load_kv(work / "icl.safetensors")
        icl = (icl_dev, icl_keys, icl_values)
    else:
        icl = None

    runs: list[builder.CandidateRun] = []
    test_trace: list[dict[str, Any]] = []
    test_trace_scores: list[list[list[float]]] = []
    for index, candidate in enumerate(grid):
        cpath = work / f"cand-{index:02d}.json"
        if cpath.is_file():
            saved = json.loads(cpath.read_text())
            run = builder.CandidateRun(candidate, trace=saved["trace"], stopped=saved["stopped"],
                                       best_iteration=saved["best_iteration"],
                                       best=builder.DevResult.from_dict(saved["best"]),
                                       seconds=saved["seconds"])
            run.keys, run.values = _load_kv(work / f"cand-{index:02d}.safetensors")
            if index == 0:
                test_trace, test_trace_scores = saved["test_trace"], saved["test_trace_scores"]
            runs.append(run)
            continue
        if deadline is not None and _now() > deadline:
            raise Deadline(f"{spec.key}: time budget reached before candidate {index} "
                           f"({candidate.name}); {index} of {len(grid)} are checkpointed")
        trace_rows: list[dict[str, Any]] = []
        trace_scores: list[list[list[float]]] = []

        def on_iteration(run, iteration, keys, values, entry, _index=index):
            if _index != 0:
                return
            # the published-default run: test accuracy at every iteration (oracle, plot)
            t = time.perf_counter()
            scores = score_test(keys, values)
            preds = scoring.predictions(scores)
            counts = [0] * max(len(s) for s in scores)
            for p in preds:
                counts[p] += 1
            metrics = scoring.accuracy(scores, labels)
            trace_rows.append({"iteration": iteration, "test_acc": metrics["acc"],
                               "test_acc_norm": metrics["acc_norm"], "test_counts": counts,
                               "test_seconds": time.perf_counter() - t})
            trace_scores.append(_rounded(scores))

        with torch.inference_mode():
            (run,), icl = builder.run_candidates(model, inputs.demo_ids, [candidate], dev,
                                                 policy, progress=progress,
                                                 on_iteration=on_iteration, icl=icl)
        if not icl_path.is_file():
            _save_kv(work / "icl.safetensors", icl[1], icl[2])
            write_json_atomic(icl_path, {"dev": icl[0].to_dict()})
        if index == 0:
            test_trace, test_trace_scores = trace_rows, trace_scores
        _save_kv(work / f"cand-{index:02d}.safetensors", run.keys, run.values)
        write_json_atomic(cpath, {"candidate": candidate.to_dict(), "trace": run.trace,
                                  "stopped": run.stopped, "best_iteration": run.best_iteration,
                                  "best": run.best.to_dict(), "seconds": run.seconds,
                                  "test_trace": trace_rows if index == 0 else None,
                                  "test_trace_scores": trace_scores if index == 0 else None})
        if progress:
            print(f"[results] {spec.key}: {candidate.name} best iteration "
                  f"{run.best_iteration} dev {run.best_dev_acc:.4f} ({run.stopped}; "
                  f"{run.seconds:.0f} s)", flush=True)
        runs.append(run)

    default = builder.choose(runs[:1], icl, policy)
    searched = builder.choose(runs, icl, policy)
    icl_test = pair_scores(test_trace_scores[0])
    dt_test = pair_scores(test_trace_scores[default.iteration - 1])
    if searched.iteration == 1:
        search_test = icl_test
    elif searched.run is runs[0]:
        search_test = pair_scores(test_trace_scores[searched.iteration - 1])
    else:
        t = time.perf_counter()
        with torch.inference_mode():
            search_test = score_test(searched.keys, searched.values)
        seconds["dt-search test"] = time.perf_counter() - t
    oracle_iteration = max(range(len(test_trace)),
                           key=lambda i: (test_trace[i]["test_acc"], -i)) + 1
    oracle_test = pair_scores(test_trace_scores[oracle_iteration - 1])

    # the adapters of dt and dt-search, for serving
    saved_adapters = {}
    selections = (("dt", default),) if args.skip_search else (("dt", default),
                                                              ("dt-search", searched))
    for name, selection in selections:
        adapter = builder.adapter_from_selection(
            model, inputs.demos_text, inputs.demo_ids, selection, dev=dev,
            label_words=inputs.label_words, task=inputs.info,
            build_args={"results_row": spec.key, "column": name},
            base_model_name_or_path=str(ctx.dir.resolve()))
        directory = Path(args.adapters_dir) / f"{spec.key}-{name}"
        adapter.save_pretrained(directory)
        saved_adapters[name] = str(directory)

    priors = {"icl": _priors(icl[0]), "dt": _priors(default.dev),
              "dt-search": _priors(searched.dev)}
    columns = {"zero-shot": _column(zero_shot, labels), "icl": _column(icl_test, labels),
               "dt": _column(dt_test, labels), "dt-search": _column(search_test, labels),
               "dt-oracle": _column(oracle_test, labels)}
    bases = (("icl", icl_test), ("dt", dt_test), ("dt-search", search_test))
    if args.skip_search:
        del columns["dt-search"]
        bases = bases[:2]
    for base, test_scores in bases:
        if priors[base] is not None:
            for method in ("content-free", "dev-prior"):
                suffix = "cf" if method == "content-free" else "dev"
                columns[f"{base}+{suffix}"] = _column(test_scores, labels, priors[base][method],
                                                      priors[base][method + "_norm"])
    comparisons = {"dt vs icl": ("icl", "dt"), "dt-search vs icl": ("icl", "dt-search"),
                   "dt vs icl+dev": ("icl+dev", "dt"), "dt vs icl+cf": ("icl+cf", "dt"),
                   "dt+dev vs icl+dev": ("icl+dev", "dt+dev"),
                   "icl+dev vs icl": ("icl", "icl+dev")}
    paired = {name: _paired(columns[a]["predictions"], columns[b]["predictions"], labels)
              for name, (a, b) in comparisons.items() if a in columns and b in columns}
    seconds["search candidates"] = sum(r.seconds for r in runs)
    seconds["published candidate"] = runs[0].seconds
    seconds["test trace"] = sum(e["test_seconds"] for e in test_trace)
    seconds["row (this invocation)"] = time.perf_counter() - started
    scores = {"zero-shot": _rounded(zero_shot), "icl": _rounded(icl_test),
              "dt": _rounded(dt_test), "dt-search": _rounded(search_test),
              "dt-oracle": _rounded(oracle_test)}
    selection = {"dt": default.summary, "dt-search": searched.summary,
                 "dt-oracle": {"iteration": oracle_iteration,
                               "note": "T picked on the test split: an upper bound, "
                                       "never a claim"}}
    if args.skip_search:
        del scores["dt-search"], selection["dt-search"]
    return {
        "schema": ROW_SCHEMA,
        "search": "skipped" if args.skip_search else "run",
        "row": {"model": spec.model, "task": spec.task, "seed": spec.seed, "key": spec.key},
        "settings": {"model_dir": str(ctx.dir), "task": task.to_dict(), "split": task.eval_split,
                     "limit": args.limit, "n_test": len(labels), "dev_size": dev.size,
                     "policy": policy.to_dict(), "grid": [c.to_dict() for c in grid],
                     "engine": "hf", "threads": torch.get_num_threads()},
        "demos": {"prefix_len": len(inputs.demo_ids), "shots_per_class": inputs.info[
                      "shots_per_class"], "indices": inputs.info["demo_indices"],
                  "fit": inputs.demos.fit},
        "labels": labels,
        "choice_tokens": test_plan.choice_lengths,
        "scores": scores,
        "priors": priors,
        "columns": columns,
        "paired": paired,
        "selection": selection,
        "test_trace": test_trace,
        "test_trace_scores": test_trace_scores,
        "adapters": saved_adapters,
        "seconds": seconds,
    }


# ----------------------------------------------------------------- the command

def _model_dir(args, name: str) -> Path:
    for item in args.model_path:
        key, sep, path = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--model-path {item!r}: expected NAME=DIR")
        if key == name:
            return Path(path)
    directory = Path(args.models_dir) / MODEL_DIRS[name]
    from vllm_deepthink.tools.gguf_models import convert_model, is_complete

    if not is_complete(directory):
        convert_model(name, directory)
    return directory


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps import results_report

    out = Path(args.out)
    specs = select_rows(args.rows)
    if args.list:
        for spec in specs:
            print(f"{spec.key:<28} {row_state(out, spec, not args.skip_search)}")
        return 0
    if args.report_only:
        print(results_report.write_report(out, ROW_SCHEMA, [s.key for s in default_rows()]))
        return 0
    bad = [s.task for s in specs if not (Path(args.data_dir) / s.task).is_dir()]
    if bad:
        raise SystemExit(f"--data-dir {args.data_dir}: no task directory for {sorted(set(bad))}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget = parse_duration(args.time_budget)
    deadline = None if budget is None else _now() + budget
    from tqdm.auto import tqdm

    finished = ("done", "done without search")
    todo = [s for s in specs if row_state(out, s, not args.skip_search) not in finished]
    print(f"[results] {len(specs) - len(todo)} of {len(specs)} rows done; "
          f"{len(todo)} to compute" + (f" (at most {args.max_rows})" if args.max_rows else "")
          + (f", time budget {budget:.0f} s" if budget else ""), flush=True)
    contexts: dict[str, ModelContext] = {}
    computed = 0
    stopped = None
    bar = tqdm(todo, desc="results rows", unit="row", disable=args.no_progress)
    for spec in bar:
        if args.max_rows is not None and computed >= args.max_rows:
            stopped = f"--max-rows {args.max_rows} reached"
            break
        if deadline is not None and _now() > deadline:
            stopped = "time budget reached"
            break
        bar.set_postfix_str(spec.key)
        if spec.model not in contexts:
            contexts.clear()  # one model in memory at a time
            contexts[spec.model] = ModelContext(spec.model, _model_dir(args, spec.model))
        try:
            row = compute_row(spec, contexts[spec.model], args, out, deadline)
        except Deadline as exc:
            stopped = str(exc)
            break
        write_json_atomic(row_path(out, spec), row)
        if not args.skip_search:  # a skip-search row keeps its checkpoints for the search
            shutil.rmtree(out / "work" / spec.key, ignore_errors=True)
        computed += 1
        c = row["columns"]
        tqdm.write(f"[results] {spec.key}: zero-shot {c['zero-shot']['acc']:.3f} icl "
                   f"{c['icl']['acc']:.3f} dt {c['dt']['acc']:.3f} (T="
                   f"{row['selection']['dt']['selected_iteration']})"
                   + (f" dt-search {c['dt-search']['acc']:.3f}" if "dt-search" in c else "")
                   + f" ({row['seconds']['row (this invocation)']:.0f} s)")
    bar.close()
    left = [s for s in specs if row_state(out, s, not args.skip_search) not in finished]
    report = results_report.write_report(out, ROW_SCHEMA, [s.key for s in default_rows()])
    print(report)
    print(f"[results] computed {computed} rows this time; {len(left)} left"
          + (f" ({stopped}); run the same command again to continue" if left else ""),
          file=sys.stderr)
    return 0
