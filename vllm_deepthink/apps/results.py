"""`vllm-deepthink results`: build adapters and write the README accuracy table.

For each model (converted with `vllm-deepthink model` when missing) and task: build a
Deep-Thinking adapter with `vllm-deepthink build` (skipped when it already exists),
then score zero-shot, ICL (the adapter's own demos) and Deep-Thinking on the task's
evaluation split with one vLLM engine per model serving every adapter. Writes
OUT/results.md (the table), OUT/results.json (every row) and OUT/json/MODEL-TASK.json
(the eval JSON of each pair, see commands/eval.py).

Defaults follow the paper: demonstrations stratified per class (classification) or
drawn at random (multiple choice), 15 iterations of momentum (step 0.01, beta 0.9),
the iteration picked on a dev split carved from train; AG News and HellaSwag are
evaluated on 2,000 sampled items. The full run is long on a CPU: use --tasks and
--limit to size it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from vllm_deepthink.tasks import BUILTIN_TASKS, CLASSIFICATION

DEFAULT_TASKS = {
    "smollm2": list(BUILTIN_TASKS),
    "gemma3-270m": ["sst2", "mr", "trec"],
}
# Demos per class for classification, demos in all for multiple choice.
DEFAULT_SHOTS = {"sst2": 2, "mr": 2, "sst5": 1, "agnews": 1, "trec": 1}
DEFAULT_MC_SHOTS = 4
PAPER_LIMITS = {"agnews": 2000, "hellaswag": 2000}
MODE_TITLES = {"zero-shot": "zero-shot", "icl": "ICL", "deepthink": "Deep-Thinking"}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[0]
    parser.add_argument("--data-dir", default="../shared/data",
                        help="directory holding the built-in task directories")
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--models", default="smollm2,gemma3-270m",
                        help="comma-separated model names (see `vllm-deepthink model`)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks for every model (default: all ten for "
                             "smollm2; sst2,mr,trec for gemma3-270m)")
    parser.add_argument("--models-dir", default="models", help="where converted models live")
    parser.add_argument("--adapters-dir", default="adapters_store/results",
                        help="where the built adapters go (TASK-MODEL)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate at most this many items per task (default: the whole "
                             "split; 2,000 for agnews and hellaswag)")
    parser.add_argument("--seed", type=int, default=0, help="demos, dev split and --limit seed")
    parser.add_argument("--shots-per-class", type=int, default=None,
                        help="override the per-task demo counts")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--dev-size", type=int, default=100)
    parser.add_argument("--patience", type=int, default=None,
                        help="stop a build after this many iterations without dev gain")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    from vllm_deepthink.apps.eval import add_block_size_arg

    add_block_size_arg(parser)
    parser.add_argument("--output-json", default=None,
                        help="also write the combined rows here (default OUT/results.json)")


def task_shots(task, override: int | None) -> int:
    if override is not None:
        return override
    if task.kind == CLASSIFICATION:
        return DEFAULT_SHOTS.get(task.name, 1)
    return DEFAULT_MC_SHOTS


def build_if_missing(model_dir: Path, task, adapter_dir: Path, args) -> float:
    """Build one adapter with the `build` command; returns seconds (0 when it existed)."""
    from vllm_deepthink.apps import cli
    from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME

    if (adapter_dir / CONFIG_NAME).is_file() and (adapter_dir / WEIGHTS_NAME).is_file():
        return 0.0
    argv = ["build", "--model", str(model_dir), "--task-dir", str(task.directory),
            "--shots-per-class", str(task_shots(task, args.shots_per_class)),
            "--seed", str(args.seed), "--iterations", str(args.iterations),
            "--select-on", "dev", "--dev-size", str(args.dev_size), "--out", str(adapter_dir)]
    if args.patience is not None:
        argv += ["--patience", str(args.patience)]
    print(f"[results] building {adapter_dir.name}: vllm-deepthink {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    cli.main(argv)
    return time.perf_counter() - start


def run_model(name: str, task_names: list[str], args) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from vllm_deepthink.apps import eval as eval_cmd
    from vllm_deepthink.tools.gguf_models import convert_model, get_model
    from vllm_deepthink.tasks import eval_rows, load_task

    spec = get_model(name)
    model_dir = convert_model(name, Path(args.models_dir) / Path(spec.default_dir).name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plans = []
    for task_name in task_names:
        task = load_task(Path(args.data_dir) / task_name)
        adapter_dir = Path(args.adapters_dir) / f"{task.name}-{name}"
        build_seconds = build_if_missing(model_dir, task, adapter_dir, args)
        adapter = eval_cmd.load_adapter_for(model_dir, adapter_dir)
        limit = args.limit if args.limit is not None else PAPER_LIMITS.get(task.name)
        rows = eval_rows(task, task.eval_split, limit, args.seed)
        plans.append((task, adapter_dir, adapter, rows, limit, build_seconds))

    modes = list(eval_cmd.MODES)
    needed = max(eval_cmd.max_prompt_len(tokenizer, t, r, a, modes) for t, _, a, r, _, _ in plans)
    start = time.perf_counter()
    scorer = eval_cmd.make_scorer(args.engine, model_dir,
                                  {t.name: a for t, _, a, _, _, _ in plans},
                                  {t.name: d for t, d, _, _, _, _ in plans}, needed,
                                  **eval_cmd.vllm_engine_kwargs(args))
    startup = time.perf_counter() - start
    out_rows = []
    try:
        for task, adapter_dir, adapter, rows, limit, build_seconds in plans:
            result = eval_cmd.evaluate(scorer, tokenizer, task, rows, modes, adapter,
                                       adapter_name=task.name)
            settings = {"model": str(model_dir), "model_name": name,
                        "task_dir": str(task.directory), "task": task.to_dict(),
                        "split": task.eval_split, "limit": limit, "seed": args.seed,
                        "engine": args.engine, "modes": modes, "block_size": args.block_size,
                        "adapter": str(adapter_dir),
                        "adapter_config": eval_cmd.adapter_summary(adapter),
                        "build_seconds": build_seconds, "engine_startup_seconds": startup}
            output = {"schema_version": eval_cmd.SCHEMA_VERSION, "settings": settings, **result}
            json_dir = Path(args.out) / "json"
            json_dir.mkdir(parents=True, exist_ok=True)
            (json_dir / f"{name}-{task.name}.json").write_text(json.dumps(output, indent=1))
            print(eval_cmd.format_table(f"{name} / {task.name} ({task.eval_split})", result),
                  flush=True)
            out_rows.append({"model": name, "task": task.name, "split": task.eval_split,
                             "n": len(rows), "metrics": result["metrics"],
                             "prefix_len": adapter.prefix_len,
                             "shots": task_shots(task, args.shots_per_class),
                             "selected_iteration": adapter.config.selected_iteration,
                             "iterations_run": adapter.config.iterations_run,
                             "build_seconds": build_seconds,
                             "eval_seconds": result["seconds"]})
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    return out_rows


def markdown_table(rows: list[dict[str, Any]], args) -> str:
    lines = [
        "# Accuracy: zero-shot vs ICL vs Deep-Thinking",
        "",
        f"Generated by `vllm-deepthink results` (engine {args.engine}, seed {args.seed}, "
        f"{args.iterations} iterations, iteration chosen on {args.dev_size} dev rows from "
        f"train). acc ranks choices by summed log-probability (acc_norm, per-token mean, in "
        f"parentheses). L = prefix tokens; T = selected iteration / iterations run.",
        "",
        "| model | task | split | n | shots | L | T | zero-shot | ICL | Deep-Thinking |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['metrics'][m]['acc']:.3f} ({r['metrics'][m]['acc_norm']:.3f})"
                 for m in ("zero-shot", "icl", "deepthink")]
        lines.append(f"| {r['model']} | {r['task']} | {r['split']} | {r['n']} | {r['shots']} | "
                     f"{r['prefix_len']} | {r['selected_iteration']}/{r['iterations_run']} | "
                     + " | ".join(cells) + " |")
    if any(r["model"] == "gemma3-270m" for r in rows):
        lines += ["", "Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
                      "(https://ai.google.dev/gemma/terms)."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.tools.gguf_models import MODELS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; expected names from {sorted(MODELS)}")
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if not (Path(args.data_dir) / t).is_dir()]
        if bad:
            raise SystemExit(f"--tasks: no task directory for {bad} under {args.data_dir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for model in models:
        task_names = tasks if args.tasks is not None else DEFAULT_TASKS.get(model, ["sst2"])
        rows.extend(run_model(model, task_names, args))
    (out / "results.md").write_text(markdown_table(rows, args), encoding="utf-8")
    combined = json.dumps({"settings": {k: v for k, v in vars(args).items()
                                        if not k.startswith("_")}, "rows": rows}, indent=1)
    (out / "results.json").write_text(combined, encoding="utf-8")
    if args.output_json:
        Path(args.output_json).write_text(combined, encoding="utf-8")
    print(markdown_table(rows, args))
    return 0
