"""`vllm-deepthink results`: the accuracy table (results/results.md), resumable.

One row per (model, task, demo seed), computed with HF transformers in this process
and written atomically to OUT/json/MODEL-TASK-sSEED.json; a row whose JSON exists is
never recomputed. Inside a row, every finished search candidate is checkpointed under
OUT/work/ROW/, and the running candidate after every scored iteration, so an
interrupted row resumes where its scoring stopped. `--max-rows` stops cleanly between
rows, `--time-budget` after the next checkpoint; run again to continue. OUT/results.md
and OUT/curves.png are regenerated from every row JSON at the end of each invocation
(`--report-only`: only that).

This module parses the flags; `table.update_table` runs (specs.py: the rows;
checkpoints.py: their files; runs.py: the candidate runs; columns.py: the columns;
row.py: one row; report.py: results.md and curves.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_deepthink.apps.errors import UsageError
from vllm_deepthink.apps.results import table
from vllm_deepthink.apps.results.checkpoints import row_state
from vllm_deepthink.apps.results.specs import DEFAULT_LIMIT, RowOptions, select_rows


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


def model_paths(items: list[str]) -> dict[str, Path]:
    """--model-path NAME=DIR items -> {NAME: DIR}."""
    paths = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--model-path {item!r}: expected NAME=DIR")
        paths.setdefault(key, Path(path))  # the first one given wins
    return paths


def row_options(args: argparse.Namespace) -> RowOptions:
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    policy = SelectionPolicy(max_iterations=args.iterations, min_iterations=args.min_iterations,
                             patience=args.patience or None, guard_k=args.guard_k)
    return RowOptions(data_dir=Path(args.data_dir), adapters_dir=Path(args.adapters_dir),
                      policy=policy, limit=args.limit, dev_size=args.dev_size,
                      batch_size=args.batch_size, skip_search=args.skip_search,
                      progress=not args.no_progress)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        specs = select_rows(args.rows)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.list:
        for spec in specs:
            print(f"{spec.key:<28} {row_state(out, spec, not args.skip_search)}")
        return 0
    if args.report_only:
        print(table.write_report(out))
        return 0
    if args.data_dir is None:
        raise UsageError("--data-dir DIR is required: the directory of the task directories "
                         "(see results/README.md, Data)")
    bad = [s.task for s in specs if not (Path(args.data_dir) / s.task).is_dir()]
    if bad:
        raise UsageError(f"--data-dir {args.data_dir}: no task directory for "
                         f"{sorted(set(bad))}; add them, or choose rows with --rows (e.g. "
                         f"'smollm2-sst2-*')")
    paths = model_paths(args.model_path)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        budget = table.parse_duration(args.time_budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run = table.update_table(out, specs, row_options(args), models_dir=args.models_dir,
                             model_paths=paths, max_rows=args.max_rows, time_budget=budget)
    print(run.report)
    print(f"[results] computed {run.computed} rows this time; {len(run.left)} left"
          + (f" ({run.stopped}); run the same command again to continue" if run.left else ""),
          file=sys.stderr)
    return 0
