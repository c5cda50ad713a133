"""Build a Deep-Thinking adapter from a model and a task directory (HF only).

    python examples/build_adapter.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --task-dir examples/data/sst2 --out adapters_store/sst2

Samples `--shots-per-class` demonstrations from the task's train.jsonl, runs
`--iterations` Deep-Thinking steps and keeps the iteration with the best accuracy on a
dev split carved from train.jsonl (disjoint from the demos). No vLLM involved.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_deepthink import tasks
from vllm_deepthink.format.hub import resolve_dir
from vllm_deepthink.producers.deepthink import builder
from vllm_deepthink.tasks import scoring
from vllm_deepthink.tasks.datasets import open_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model: a directory or a hub id")
    parser.add_argument("--task-dir", required=True,
                        help="task directory (train.jsonl, ...; or a task.json naming a "
                             "`datasets` dataset, see examples/tasks)")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--shots-per-class", type=int, default=None,
                        help="default: the task's (task.json \"shots\" or the paper's), else 1")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--dev-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_dir = resolve_dir(args.model)  # a local directory, or the hub snapshot of ORG/NAME
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = open_task(args.task_dir)

    shots = args.shots_per_class or tasks.default_shots(task) or 1
    demos = tasks.sample_demos(task, shots, args.seed)
    dev_rows = tasks.dev_split(task, args.dev_size, args.seed, exclude=set(demos.indices))
    adapter = builder.build_adapter(
        model, tokenizer, demos.text, iterations=args.iterations,
        dev_items=scoring.items_from_rows(task, dev_rows),
        task={**task.to_dict(), "shots_per_class": shots, "seed": args.seed},
        base_model_name_or_path=str(model_dir if Path(args.model).is_dir() else args.model))
    adapter.save_pretrained(args.out)

    config = adapter.config
    best = config.selection_trace[config.selected_iteration - 1]
    print(f"{args.out}: prefix of {config.prefix_len} tokens, iteration "
          f"{config.selected_iteration} of {config.iterations_run} kept "
          f"(dev accuracy {best['dev_acc']:.3f})")


if __name__ == "__main__":
    main()
