"""`vllm-deepthink compression`: the compression table (results/compression/), resumable.

One row per (model, task, demo seed) of the accuracy table (results/json/), whose
demonstrations, dev-selected recipe and test items it reuses: the source adapter rebuilt,
then selection at k = L/2, L/4, L/8 and 16 and distillation at L/8 and 16 (source
teacher) and at L/8 with the calibrated, the ensemble and the calibrated ensemble
teacher, each scored on the
same test items. The row JSON (OUT/json/KEY.json) is rewritten after every column and
is the checkpoint: run the same command again to continue (`--time-budget` stops after
the next column). OUT/compression.md and compression.png are regenerated at the end of
every invocation (`--report-only`: only that).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vllm_deepthink.apps.compression import report
from vllm_deepthink.apps.compression.specs import (COLUMN_NAMES, DEFAULT_LIMIT, TableOptions,
                                                   select_rows)
from vllm_deepthink.apps.errors import UsageError


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument("--data-dir", default=None,
                        help="directory of the task directories (as `vllm-deepthink results`)")
    parser.add_argument("--results-dir", default="results",
                        help="the accuracy table whose row JSONs (DIR/json) the rows reuse")
    parser.add_argument("--out", default="results/compression", help="output directory")
    parser.add_argument("--models-dir", default="models", help="where converted models live")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row keys or patterns (e.g. 'smollm2-*-s0')")
    parser.add_argument("--columns", default=",".join(COLUMN_NAMES),
                        help=f"comma-separated columns (default all: {','.join(COLUMN_NAMES)})")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help="a random N of each row's test items, seed 0 (default: all)")
    parser.add_argument("--queries", type=int, default=256,
                        help="train rows drawn as the compressor's queries (default 256)")
    parser.add_argument("--steps", type=int, default=60, help="distillation steps (default 60)")
    parser.add_argument("--time-budget", default=None,
                        help="stop after the next column once this long has passed, e.g. 2h")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps a background run steady beside "
                             "other work)")
    parser.add_argument("--list", action="store_true", help="print each row's columns done")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.compression.table import row_states, update_table
    from vllm_deepthink.apps.results.table import parse_duration

    out = Path(args.out)
    try:
        specs = select_rows(args.rows)
        budget = parse_duration(args.time_budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    unknown = sorted(set(columns) - set(COLUMN_NAMES))
    if unknown:
        raise UsageError(f"--columns: unknown {unknown}; choose from {list(COLUMN_NAMES)}")
    if args.list:
        for key, state in row_states(out, specs, columns):
            print(f"{key:<28} {state}")
        return 0
    if args.report_only:
        print(report.write_report(out))
        return 0
    if args.data_dir is None:
        raise UsageError("--data-dir DIR is required: the directory of the task directories")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = TableOptions(data_dir=Path(args.data_dir), results_dir=Path(args.results_dir),
                           columns=columns, limit=args.limit, queries=args.queries,
                           steps=args.steps, progress=not args.no_progress)
    deadline = None if budget is None else time.time() + budget
    computed, stopped = update_table(out, specs, options, args.models_dir, deadline)
    print(report.write_report(out))
    print(f"[compression] {computed} rows finished this time"
          + (f"; stopped: {stopped}; run the same command again to continue" if stopped else ""),
          file=sys.stderr)
    return 0
