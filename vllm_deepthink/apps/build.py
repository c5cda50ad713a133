"""`vllm-deepthink build`: build a Deep-Thinking adapter with HF transformers (no vLLM).

This module parses the flags; `producers.deepthink.from_task.build_from_task` builds one
adapter, `producers.deepthink.manifest.build_manifest` every task of `--manifest`. With
--prefix-len K or --ratio R the adapter is then compressed to k positions
(`producers.compress.build_compressed_from_task`; the flags of `vllm-deepthink compress`,
apps/compress.py) and the compressed adapter is the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_deepthink.apps.errors import UsageError

# The flags of the policy (`--iterations` ...) -> SelectionPolicy's fields.
POLICY_FLAGS = {"iterations": "max_iterations", "min_iterations": "min_iterations",
                "patience": "patience", "guard_k": "guard_k", "collapse_drop": "collapse_drop"}
# Flags of one build that --manifest refuses: each line says them for its task.
ONE_BUILD_FLAGS = ("task_dir", "dataset", "demos_text", "out")
# Flags of a manifest build only (not build_from_task's parameters).
MANIFEST_FLAGS = ("manifest", "out_dir", "workers", "threads", "ray", "ray_address",
                  "no_progress")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from vllm_deepthink.producers.deepthink import iteration, search
    from vllm_deepthink.producers.deepthink.from_task import DEFAULT_DEV_SIZE, DTYPES, SELECT_ON
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
    from vllm_deepthink.tasks.task import SPLITS

    defaults = SelectionPolicy()
    parser.add_argument("--model",
                        help="HF model: a local directory or a hub id (ORG/NAME, resolved "
                             "through the Hugging Face cache; HF_HUB_OFFLINE is honoured); "
                             "required, except with --manifest when every line names one")
    parser.add_argument("--revision", default=None, help="hub revision of --model")
    parser.add_argument("--demos-text", help="file holding the exact demonstration string")
    parser.add_argument("--task-dir", help="task directory (train.jsonl, ...) to sample demos "
                                           "from; with --dataset, the directory of its task.json")
    parser.add_argument("--dataset", help="rows from the `datasets` library: NAME[:CONFIG] of "
                                          "the hub or a local json/csv/parquet file or "
                                          "directory (its task.json: --task-dir, or inside it)")
    parser.add_argument("--shots-per-class", type=int,
                        help="demos per label (in all for multiple choice); default: the "
                             "task.json's \"shots\", else the paper's count of a built-in task "
                             "(SST-2 4, SST-5 2, MR 4, AG News 2, TREC 2, multiple choice 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="demo sampling and dev split seed (with --prefix-len also the "
                             "compression's query draw, dev split and batch order)")
    parser.add_argument("--iterations", type=int, default=defaults.max_iterations,
                        help="maximum Deep-Thinking iterations T (1 = plain ICL); "
                             f"default {defaults.max_iterations}")
    parser.add_argument("--optimizer", choices=iteration.OPTIMIZERS, default=None,
                        help="default momentum (the published v1 code)")
    parser.add_argument("--step-size", type=float,
                        help=f"momentum step size (default {search.DEFAULT_STEP_SIZE})")
    parser.add_argument("--beta", type=float,
                        help=f"momentum coefficient (default {search.DEFAULT_BETA})")
    parser.add_argument("--eta", type=float,
                        help=f"ema weight of the new K/V (default {search.DEFAULT_EMA_ETA})")
    parser.add_argument("--position-mode", choices=iteration.POSITION_MODES, default=None,
                        help="aligned: rotate the new keys back by L positions so the update "
                             "sees content only (RoPE models); published: the published code "
                             "exactly (the default; the two are the same for learned positions)")
    parser.add_argument("--search", action="store_true",
                        help="select the update strength on dev too: momentum step {0.01, "
                             "0.03} x beta {0.9, 0}, ema eta {0.05, 0.1, 0.2}, each in "
                             "position mode published and (RoPE models) aligned")
    parser.add_argument("--select-on", choices=SELECT_ON,
                        help="dev: keep the iteration chosen on a dev split (default with "
                             "--task-dir); none: keep the last (default with --demos-text)")
    parser.add_argument("--dev-size", type=int, default=DEFAULT_DEV_SIZE,
                        help="dev rows drawn at random from the --dev-split (train: disjoint "
                             f"from the demos) (default {DEFAULT_DEV_SIZE})")
    parser.add_argument("--dev-split", choices=SPLITS, default="train",
                        help="where the dev rows come from: train (default; disjoint from the "
                             "demos) or a held-out split of the task that is not its "
                             "evaluation split, e.g. validation when the task evaluates on "
                             "test (use it when train rows differ in kind from the test rows)")
    parser.add_argument("--stratify-dev", action="store_true",
                        help="draw the dev split with an equal count per label")
    parser.add_argument("--min-iterations", type=int, default=defaults.min_iterations,
                        help="every run goes this far; patience counts only after it "
                             f"(default {defaults.min_iterations})")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="after --min-iterations, stop a run after this many iterations "
                             f"without a better dev accuracy (default {defaults.patience}; "
                             "0: never)")
    parser.add_argument("--guard-k", type=float, default=defaults.guard_k,
                        help="leave T=1 only when the dev gain exceeds K paired standard "
                             f"errors, sqrt(discordant)/n_dev (default {defaults.guard_k:g}; "
                             "0: any gain)")
    parser.add_argument("--collapse-drop", type=float, default=defaults.collapse_drop,
                        help="stop a run once its dev accuracy stays this far below its best "
                             f"for {defaults.collapse_span} iterations (default "
                             f"{defaults.collapse_drop}; 0: never)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="dev scoring batch size (with --prefix-len also the "
                             "compression's queries per batch and step)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", help="adapter directory (default adapters_store/TASK-MODEL)")
    parser.add_argument("--output-json", help="also write a JSON summary of the build here")
    from vllm_deepthink.apps.compress import add_compress_args

    add_compress_args(parser, for_build=True)
    many = parser.add_argument_group(
        "many adapters", "--manifest FILE: one JSON object per line, {\"name\": ..., "
        "\"task_dir\": ..., \"seed\": ...} (build_from_task's parameter names); the flags "
        "above that are given apply to every line that does not set them")
    many.add_argument("--manifest", help="JSONL file of the tasks to build (docs/building.md, "
                                         "\"Building many adapters\")")
    many.add_argument("--out-dir", help="with --manifest: the store, one adapter per "
                                        "OUT_DIR/NAME, and OUT_DIR/_manifest_summary.json")
    many.add_argument("--workers", type=int, default=1,
                      help="worker processes (Ray actors with --ray), each opening the model "
                           "once (default 1: in this process)")
    many.add_argument("--threads", type=int,
                      help="torch threads per worker (default: the cores shared among the "
                           "workers; with --ray, the cluster's CPUs)")
    many.add_argument("--ray", action="store_true",
                      help="build on Ray actors (pip install 'vllm-deepthink[ray]')")
    many.add_argument("--ray-address",
                      help="ray.init address of the cluster (default: a local instance, or "
                           "RAY_ADDRESS)")
    many.add_argument("--no-progress", action="store_true", help="no progress bar")


def policy_from_args(args):
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, found {args.iterations}")
    if args.patience is not None and args.patience < 0:
        raise UsageError(f"--patience must be >= 0, found {args.patience}")
    try:
        return SelectionPolicy(max_iterations=args.iterations,
                               min_iterations=args.min_iterations,
                               patience=args.patience or None, guard_k=args.guard_k,
                               collapse_drop=args.collapse_drop or None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _model_stem(model: str) -> str:
    """The last part of a model's name: its directory's name, or the hub id's NAME."""
    path = Path(model).expanduser()
    return (path.resolve() if path.is_dir() else Path(model)).name


def default_out(args) -> Path:
    if args.task_dir or args.dataset:
        source = Path(args.task_dir or args.dataset.replace(":", "-"))
        name = source.stem if source.is_file() else source.name
    else:
        name = Path(args.demos_text).stem
    return Path("adapters_store") / f"{name}-{_model_stem(args.model)}".lower()


def read_demos_text(path: str | None) -> str | None:
    """--demos-text FILE read exactly (newline="" keeps \\r\\n; read_text would
    translate it)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--demos-text {path}: no such file")
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def builder_errors() -> tuple[type[Exception], ...]:
    """The library's errors of input a command cannot use (printed as usage errors)."""
    from vllm_deepthink import tasks
    from vllm_deepthink.format.hub import HubResolutionError
    from vllm_deepthink.producers.deepthink.errors import BuildError

    from vllm_deepthink.producers.compress import CompressError

    return BuildError, tasks.TaskError, HubResolutionError, CompressError


def manifest_defaults(args) -> dict:
    """The build flags given on the command line (those that differ from their
    defaults), as build_from_task's parameters: they apply to every line."""
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    flags = {a.dest for a in parser._actions if a.option_strings} - {
        "help", "output_json", *MANIFEST_FLAGS, *compress_defaults()}
    given = {dest: getattr(args, dest) for dest in flags
             if getattr(args, dest) != parser.get_default(dest)}
    policy = policy_from_args(args).to_dict()
    chosen = {POLICY_FLAGS[flag]: policy[POLICY_FLAGS[flag]]
              for flag in POLICY_FLAGS if flag in given and given.pop(flag) is not None}
    return {**given, **({"policy": chosen} if chosen else {})}


def main_manifest(args: argparse.Namespace) -> int:
    from vllm_deepthink.producers.deepthink.manifest import FAILED, build_manifest, write_summary

    given = [dest for dest, default in compress_defaults().items()
             if getattr(args, dest) != default]
    if given:
        raise UsageError("with --manifest, a line compresses its adapter with its own "
                         "\"compress\" object, e.g. {\"compress\": {\"prefix_len\": 16, "
                         "\"distill\": true}} (docs/building.md); drop --prefix-len, --ratio "
                         "and the other compression flags")
    wrong = [f"--{flag.replace('_', '-')}" for flag in ONE_BUILD_FLAGS if getattr(args, flag)]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: one build's flags; with --manifest each line "
                         f"gives its task (\"task_dir\", \"dataset\", \"demos_text\") and "
                         f"its adapter goes to --out-dir/NAME")
    if not args.out_dir:
        raise UsageError("--manifest needs --out-dir, the directory of the adapters")
    try:
        summary = build_manifest(args.manifest, args.out_dir,
                                 defaults=manifest_defaults(args), workers=args.workers,
                                 threads=args.threads, ray=args.ray,
                                 ray_address=args.ray_address, progress=not args.no_progress)
    except builder_errors() as exc:
        raise UsageError(str(exc)) from None
    print(summary.table())
    if args.output_json:
        write_summary(summary, args.output_json)
    return 1 if summary.of(FAILED) else 0


def main(args: argparse.Namespace) -> int:
    if args.manifest:
        return main_manifest(args)
    if not args.model:
        raise UsageError("--model is required (or --manifest with a \"model\" per line)")
    for flag in MANIFEST_FLAGS[1:]:
        if getattr(args, flag) not in (None, False, 1):
            raise UsageError(f"--{flag.replace('_', '-')} applies to --manifest only")
    return main_one(args)


def main_one(args: argparse.Namespace) -> int:
    import time

    from vllm_deepthink.apps import compress as compress_cli
    from vllm_deepthink.producers.deepthink.from_task import build_from_task, build_summary

    start = time.perf_counter()
    policy = policy_from_args(args)
    settings = compress_cli.compress_settings(args)
    compressing = settings is not None
    if compressing:
        compress_cli.check_settings(settings, bool(args.task_dir or args.dataset),
                                    for_build=True)
    elif any(getattr(args, dest) != default for dest, default in compress_defaults().items()):
        raise UsageError("the compression flags (--queries, --distill, ...) apply with "
                         "--prefix-len K or --ratio R")
    out = Path(args.out) if args.out else default_out(args)
    build_args = {k: v for k, v in vars(args).items()
                  if not k.startswith("_") and k not in MANIFEST_FLAGS}
    build_args["out"] = str(out)
    kwargs = dict(
        task_dir=args.task_dir, dataset=args.dataset,
        demos_text=read_demos_text(args.demos_text), revision=args.revision,
        shots_per_class=args.shots_per_class, seed=args.seed, search=args.search,
        optimizer=args.optimizer, step_size=args.step_size, beta=args.beta, eta=args.eta,
        position_mode=args.position_mode, policy=policy, select_on=args.select_on,
        dev_size=args.dev_size, dev_split=args.dev_split, stratify_dev=args.stratify_dev,
        batch_size=args.batch_size, dtype=args.dtype, build_args=build_args)
    from vllm_deepthink.producers.compress import CompressError, build_compressed_from_task

    try:
        if compressing:
            adapter = build_compressed_from_task(args.model, compress=settings,
                                                 on_step=compress_cli.report_step, **kwargs)
        else:
            adapter = build_from_task(args.model, **kwargs)
    except CompressError as exc:  # its `dev_size` / `patience` are build's other flags
        raise UsageError(compress_cli.flag_message(str(exc), for_build=True)) from None
    except builder_errors() as exc:
        raise UsageError(str(exc)) from None
    adapter.save_pretrained(out)
    if compressing:
        compress_cli.write_result(adapter, out, time.perf_counter() - start, args.output_json)
        return 0
    cfg = adapter.config
    print(f"selected iteration {cfg.selected_iteration} of {cfg.iterations_run} "
          f"({cfg.optimizer} {cfg.optimizer_params}, {cfg.position_mode}); adapter saved to {out}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(build_summary(cfg, out), indent=2) + "\n",
                                          encoding="utf-8")
    return 0


def compress_defaults() -> dict:
    """The compression flags' dests -> their defaults (add_compress_args)."""
    from vllm_deepthink.apps.compress import add_compress_args

    parser = argparse.ArgumentParser()
    add_compress_args(parser, for_build=True)
    return {a.dest: a.default for a in parser._actions if a.option_strings and
            a.dest != "help"}
