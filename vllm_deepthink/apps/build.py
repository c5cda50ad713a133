"""`vllm-deepthink build`: build a Deep-Thinking adapter with HF transformers (no vLLM)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from vllm_deepthink.producers.deepthink import search
    from vllm_deepthink.producers.deepthink.from_task import DEFAULT_DEV_SIZE
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    defaults = SelectionPolicy()
    parser.add_argument("--model", required=True,
                        help="HF model: a local directory or a hub id (ORG/NAME, resolved "
                             "through the Hugging Face cache; HF_HUB_OFFLINE is honoured)")
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
    parser.add_argument("--seed", type=int, default=0, help="demo sampling and dev split seed")
    parser.add_argument("--iterations", type=int, default=defaults.max_iterations,
                        help="maximum Deep-Thinking iterations T (1 = plain ICL); "
                             f"default {defaults.max_iterations}")
    parser.add_argument("--optimizer", choices=("momentum", "ema"), default=None,
                        help="default momentum (the published v1 code)")
    parser.add_argument("--step-size", type=float,
                        help=f"momentum step size (default {search.DEFAULT_STEP_SIZE})")
    parser.add_argument("--beta", type=float,
                        help=f"momentum coefficient (default {search.DEFAULT_BETA})")
    parser.add_argument("--eta", type=float,
                        help=f"ema weight of the new K/V (default {search.DEFAULT_EMA_ETA})")
    parser.add_argument("--position-mode", choices=("published", "aligned"), default=None,
                        help="aligned: rotate the new keys back by L positions so the update "
                             "sees content only (RoPE models); published: the published code "
                             "exactly (the default; the two are the same for learned positions)")
    parser.add_argument("--search", action="store_true",
                        help="select the update strength on dev too: momentum step {0.01, "
                             "0.03} x beta {0.9, 0}, ema eta {0.05, 0.1, 0.2}, each in "
                             "position mode published and (RoPE models) aligned")
    parser.add_argument("--select-on", choices=("dev", "none"),
                        help="dev: keep the iteration chosen on a dev split (default with "
                             "--task-dir); none: keep the last (default with --demos-text)")
    parser.add_argument("--dev-size", type=int, default=DEFAULT_DEV_SIZE,
                        help="dev rows drawn at random from the --dev-split (train: disjoint "
                             f"from the demos) (default {DEFAULT_DEV_SIZE})")
    parser.add_argument("--dev-split", choices=("train", "validation", "test"), default="train",
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
    parser.add_argument("--batch-size", type=int, default=16, help="dev scoring batch size")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", help="adapter directory (default adapters_store/TASK-MODEL)")
    parser.add_argument("--output-json", help="also write a JSON summary of the build here")


def _fail(message: str) -> None:
    raise SystemExit(f"vllm-deepthink build: error: {message}")


def candidates_from_args(args, config) -> list:
    """The candidates a build runs: the grid with --search, else one."""
    from vllm_deepthink.producers.deepthink import search

    explicit = [f"--{name.replace('_', '-')}" for name in ("optimizer", "step_size", "beta",
                                                             "eta", "position_mode")
                if getattr(args, name) is not None]
    if args.search:
        if explicit:
            _fail(f"--search selects the optimizer on dev; drop {', '.join(explicit)}")
        return search.search_grid(search.position_modes(config))
    optimizer = args.optimizer or "momentum"
    mode = args.position_mode or search.PUBLISHED.position_mode
    if optimizer == "momentum":
        if args.eta is not None:
            _fail("--eta belongs to --optimizer ema; with momentum use --step-size / --beta")
        params = {"step_size": search.DEFAULT_STEP_SIZE if args.step_size is None
                  else args.step_size,
                  "beta": search.DEFAULT_BETA if args.beta is None else args.beta}
    else:
        if args.step_size is not None or args.beta is not None:
            _fail("--step-size / --beta belong to --optimizer momentum; with ema use --eta")
        params = {"eta": search.DEFAULT_EMA_ETA if args.eta is None else args.eta}
    return [search.Candidate(optimizer, params, mode)]


def policy_from_args(args):
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    try:
        return SelectionPolicy(max_iterations=args.iterations,
                               min_iterations=args.min_iterations,
                               patience=args.patience or None, guard_k=args.guard_k,
                               collapse_drop=args.collapse_drop or None)
    except ValueError as exc:
        _fail(str(exc))


def default_out(args) -> Path:
    if args.task_dir or args.dataset:
        source = Path(args.task_dir or args.dataset.replace(":", "-"))
        name = source.stem if source.is_file() else source.name
    else:
        name = Path(args.demos_text).stem
    return Path("adapters_store") / f"{name}-{Path(model_name(args.model)).name}".lower()


def model_name(model: str) -> str:
    """What the adapter records as its base model: the absolute directory of a local
    model, else the hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def _check_args(args) -> str:
    if args.iterations < 1:
        _fail(f"--iterations must be >= 1, found {args.iterations}")
    if args.demos_text and (args.task_dir or args.dataset):
        _fail("give the demonstrations as --demos-text FILE, or a task to sample them from "
              "(--task-dir DIR and/or --dataset SPEC), not both")
    if not (args.demos_text or args.task_dir or args.dataset):
        _fail("no demonstrations: give --task-dir DIR (and/or --dataset SPEC) to sample them "
              "from a task, or --demos-text FILE with the exact demonstration string")
    if args.task_dir or args.dataset:
        if args.shots_per_class is not None and args.shots_per_class < 1:
            _fail(f"--shots-per-class must be >= 1, found {args.shots_per_class}")
        if args.task_dir and not Path(args.task_dir).is_dir():
            _fail(f"--task-dir {args.task_dir}: no such directory")
    else:
        if args.shots_per_class is not None:
            _fail("--shots-per-class applies to a task (--task-dir / --dataset), not "
                  "--demos-text")
        if not Path(args.demos_text).is_file():
            _fail(f"--demos-text {args.demos_text}: no such file")
        if args.select_on == "dev":
            _fail("--select-on dev needs a task (--task-dir / --dataset): the dev split comes "
                  "from its training rows")
    select_on = args.select_on or ("dev" if args.task_dir or args.dataset else "none")
    if args.search and select_on != "dev":
        _fail("--search needs --select-on dev (with --task-dir / --dataset): candidates are "
              "compared on dev")
    if args.dev_size < 1:
        _fail(f"--dev-size must be >= 1, found {args.dev_size}")
    if args.dev_split != "train" and select_on != "dev":
        _fail(f"--dev-split {args.dev_split} applies to --select-on dev, which this build "
              f"does not use")
    if args.patience is not None and args.patience < 0:
        _fail(f"--patience must be >= 0, found {args.patience}")
    return select_on


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def format_entry(entry: dict[str, Any]) -> str:
    line = f"{entry.get('candidate', ''):<36} iteration {entry['iteration']:>3}"
    if entry["dev_acc"] is not None:
        line += (f"  dev acc {entry['dev_acc']:.4f}  acc_norm {entry['dev_acc_norm']:.4f}"
                 f"  predicted {entry['dev_counts']}")
    return line


def format_selection(summary: dict[str, Any]) -> str:
    if summary.get("select_on") != "dev":
        return "select on none: the last iteration is kept"
    g = summary["guard"]
    return (f"best: {summary['best_run']} iteration {summary['best_iteration']} dev acc "
            f"{summary['best_dev_acc']:.4f} vs T=1 {summary['t1_dev_acc']:.4f}: gain "
            f"{g['gain']:+.4f}, paired SE {g['paired_se']:.4f} (discordant {g['discordant']}), "
            f"guard {g['k']:g} SE {'passed' if g['passed'] else 'not passed'} -> kept "
            f"iteration {summary['selected_iteration']}")


@dataclass
class Demonstrations:
    """What a build starts from: the demonstration string and, from a task, the dev and
    content-free items, label words and the task record."""

    demos_text: str
    task_info: dict[str, Any] | None = None
    dev_items: list | None = None
    content_free_items: list = field(default_factory=list)
    label_words: list | None = None


def resolve_model(args) -> Path:
    """--model (a directory or a hub id at --revision) as a local directory."""
    from vllm_deepthink.format.hub import MODEL_FILES, HubResolutionError, resolve_dir

    try:
        return resolve_dir(args.model, revision=args.revision, allow_patterns=MODEL_FILES)
    except HubResolutionError as exc:
        _fail(str(exc))


def demonstrations_from_args(args, tokenizer, config, select_on: str) -> Demonstrations:
    """--demos-text read exactly, or demonstrations, dev split and content-free queries
    sampled from the task of --task-dir / --dataset."""
    if not (args.task_dir or args.dataset):
        # newline="": the exact string, \r\n included (read_text would translate it)
        with open(args.demos_text, encoding="utf-8", newline="") as handle:
            return Demonstrations(handle.read())
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.deepthink import builder
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.tasks.datasets import open_task

    try:
        task = open_task(args.task_dir, args.dataset)
        inputs = task_build_inputs(task, tokenizer, config,
                                   shots_per_class=args.shots_per_class, seed=args.seed,
                                   select_on_dev=select_on == "dev",
                                   dev_size=args.dev_size, stratify_dev=args.stratify_dev,
                                   dev_split=args.dev_split)
    except (tasks.TaskError, builder.BuildError) as exc:
        _fail(str(exc))
    fit = inputs.demos.fit
    if fit and fit["replaced"]:
        print(f"demonstrations: the first draw was {fit['tokens_first_draw']} tokens, over "
              f"this model's {fit['max_tokens']}; replaced {len(fit['replaced'])} of them "
              f"by shorter rows of the same label ({fit['tokens']} tokens)", file=sys.stderr)
    return Demonstrations(inputs.demos_text, inputs.info, inputs.dev_items,
                          inputs.content_free_items, inputs.label_words)


def check_demonstrations(tokenizer, config, demos_text: str, candidates) -> list[int]:
    """The demonstration ids, checked against every candidate before the weights load."""
    from vllm_deepthink.producers.deepthink import builder

    demo_ids = builder.tokenize_demos(tokenizer, demos_text)
    try:
        for c in candidates:
            builder.check_build_supported(config, len(demo_ids), c.position_mode)
    except builder.BuildError as exc:
        _fail(str(exc))
    return demo_ids


def format_plan(args, demo_ids, candidates, policy, select_on: str, dev_items) -> str:
    what = (f"--search ({len(candidates)} candidates)" if args.search
            else f"{candidates[0].name}")
    return (f"demonstrations: {len(demo_ids)} tokens; up to {policy.max_iterations} "
            f"iterations, {what}, select on {select_on}"
            + (f" ({len(dev_items)} dev items, min {policy.min_iterations} iterations, "
               f"patience {policy.patience}, guard {policy.guard_k:g} SE)" if dev_items
               else ""))


def run_build(args, model_dir: Path, tokenizer, demos: Demonstrations, candidates, policy,
              select_on: str, out: Path):
    """Load the model and run the builder; the adapter (not yet saved)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from vllm_deepthink.producers.deepthink import builder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.eval()

    def report(entry: dict[str, Any]) -> None:
        tqdm.write(format_entry(entry), file=sys.stderr)

    build_args = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    build_args.update(select_on=select_on, out=str(out), policy=policy.to_dict(),
                      candidates=[c.to_dict() for c in candidates])
    with torch.inference_mode():
        return builder.build_adapter(
            model, tokenizer, demos.demos_text, candidates=candidates,
            dev_items=demos.dev_items if select_on == "dev" else None,
            content_free_items=demos.content_free_items, policy=policy,
            label_words=demos.label_words, task=demos.task_info,
            build_args=_json_safe(build_args),
            base_model_name_or_path=model_name(args.model),
            score_batch_size=args.batch_size, on_iteration=report)


def build_summary(cfg, out: Path) -> dict[str, Any]:
    """The JSON of --output-json."""
    return {"out": str(out), "prefix_len": cfg.prefix_len,
            "iterations_run": cfg.iterations_run, "selected_iteration": cfg.selected_iteration,
            "optimizer": cfg.optimizer, "optimizer_params": cfg.optimizer_params,
            "position_mode": cfg.position_mode, "selection_trace": cfg.selection_trace,
            "selection": cfg.selection, "label_calibration": cfg.label_calibration}


def main(args: argparse.Namespace) -> int:
    select_on = _check_args(args)
    out = Path(args.out) if args.out else default_out(args)
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model(args)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    candidates = candidates_from_args(args, config)
    policy = policy_from_args(args)
    demos = demonstrations_from_args(args, tokenizer, config, select_on)
    demo_ids = check_demonstrations(tokenizer, config, demos.demos_text, candidates)
    print(format_plan(args, demo_ids, candidates, policy, select_on, demos.dev_items),
          file=sys.stderr)
    adapter = run_build(args, model_dir, tokenizer, demos, candidates, policy, select_on, out)
    adapter.save_pretrained(out)
    cfg = adapter.config
    print(format_selection(cfg.selection), file=sys.stderr)
    print(f"selected iteration {cfg.selected_iteration} of {cfg.iterations_run} "
          f"({cfg.optimizer} {cfg.optimizer_params}, {cfg.position_mode}); adapter saved to {out}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(build_summary(cfg, out), indent=2) + "\n",
                                          encoding="utf-8")
    return 0
