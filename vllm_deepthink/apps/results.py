"""`vllm-deepthink results`: the accuracy table (results/results.md), resumable.

One row per (model, task, demo seed), computed with HF transformers in this process
(the builder's library functions, tasks.scoring.score_plan) and written atomically
to OUT/json/MODEL-TASK-sSEED.json; a row whose JSON exists is never recomputed.
Inside a row, every finished search candidate is checkpointed under OUT/work/ROW/
(its trace, dev result and best K/V), and the running candidate after every scored
iteration, so an interrupted row resumes where its scoring stopped. `--max-rows` stops
cleanly between rows, `--time-budget` after the next checkpoint; run again to
continue. OUT/results.md and OUT/curves.png are regenerated from every row JSON
at the end of each invocation (`--report-only`: only that).

The rows, their columns and checkpoints: apps/results_rows.py; the report (means over
the (task, seed) pairs of a model with bootstrap intervals, the curves):
apps/results_report.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
import time
from pathlib import Path

from vllm_deepthink.apps.results_rows import (
    DEFAULT_LIMIT,
    MODEL_DIRS,
    ROW_SCHEMA,
    Deadline,
    ModelContext,
    RowOptions,
    RowSpec,
    compute_row,
    default_rows,
    row_path,
    row_state,
    work_dir,
    write_json_atomic,
)

FINISHED = ("done", "done without search")


def _now() -> float:
    """Wall-clock time of the time budget (one place, so tests can move it)."""
    return time.time()


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
    parser.add_argument("--data-dir", default=None,
                        help="directory holding one task directory per task of the rows, named "
                             "sst2, mr, trec, sst5, agnews, copa, ... (jsonl files as in "
                             "examples/data, or a task.json naming a `datasets` dataset as in "
                             "examples/tasks); needed unless --list or --report-only")
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
                        help="stop cleanly (at the next checkpoint: a finished search "
                             "candidate or a scored iteration) after this long, e.g. 2h; run "
                             "again to continue")
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


def row_options(args: argparse.Namespace) -> RowOptions:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    policy = SelectionPolicy(max_iterations=args.iterations, min_iterations=args.min_iterations,
                             patience=args.patience or None, guard_k=args.guard_k)
    return RowOptions(data_dir=Path(args.data_dir), adapters_dir=Path(args.adapters_dir),
                      policy=policy, limit=args.limit, dev_size=args.dev_size,
                      batch_size=args.batch_size, skip_search=args.skip_search,
                      progress=not args.no_progress)


def _row_line(key: str, row: dict) -> str:
    c = row["columns"]
    return (f"[results] {key}: zero-shot {c['zero-shot']['acc']:.3f} icl "
            f"{c['icl']['acc']:.3f} dt {c['dt']['acc']:.3f} (T="
            f"{row['selection']['dt']['selected_iteration']})"
            + (f" dt-search {c['dt-search']['acc']:.3f}" if "dt-search" in c else "")
            + f" ({row['seconds']['row (this invocation)']:.0f} s)")


def compute_rows(args: argparse.Namespace, out: Path, todo: list[RowSpec],
                 deadline: float | None) -> tuple[int, str | None]:
    """Compute the rows of `todo` in order, one model in memory at a time; stop at
    --max-rows or the deadline. Returns (rows computed, why it stopped or None)."""
    from tqdm.auto import tqdm

    options = None  # built at the first row computed (as before: flags no row uses never fail)
    contexts: dict[str, ModelContext] = {}
    computed, stopped = 0, None
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
        options = options or row_options(args)
        try:
            row = compute_row(spec, contexts[spec.model], options, out, deadline, now=_now)
        except Deadline as exc:
            stopped = str(exc)
            break
        write_json_atomic(row_path(out, spec), row)
        if not args.skip_search:  # a skip-search row keeps its checkpoints for the search
            shutil.rmtree(work_dir(out, spec), ignore_errors=True)
        computed += 1
        tqdm.write(_row_line(spec.key, row))
    bar.close()
    return computed, stopped


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
    if args.data_dir is None:
        raise SystemExit("vllm-deepthink results: error: --data-dir DIR is required: the "
                         "directory of the task directories (see results/README.md, Data)")
    bad = [s.task for s in specs if not (Path(args.data_dir) / s.task).is_dir()]
    if bad:
        raise SystemExit(f"--data-dir {args.data_dir}: no task directory for {sorted(set(bad))}; "
                         f"add them, or choose rows with --rows (e.g. 'smollm2-sst2-*')")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget = parse_duration(args.time_budget)
    deadline = None if budget is None else _now() + budget
    todo = [s for s in specs if row_state(out, s, not args.skip_search) not in FINISHED]
    print(f"[results] {len(specs) - len(todo)} of {len(specs)} rows done; "
          f"{len(todo)} to compute" + (f" (at most {args.max_rows})" if args.max_rows else "")
          + (f", time budget {budget:.0f} s" if budget else ""), flush=True)
    computed, stopped = compute_rows(args, out, todo, deadline)
    left = [s for s in specs if row_state(out, s, not args.skip_search) not in FINISHED]
    report = results_report.write_report(out, ROW_SCHEMA, [s.key for s in default_rows()])
    print(report)
    print(f"[results] computed {computed} rows this time; {len(left)} left"
          + (f" ({stopped}); run the same command again to continue" if left else ""),
          file=sys.stderr)
    return 0
