"""What a build from a task directory needs: demonstrations (fitted to the model),
the dev split, the content-free queries, and the record of how they were made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_deepthink import tasks
from vllm_deepthink.producers.deepthink import builder
from vllm_deepthink.tasks import calibration, scoring

DEFAULT_DEV_SIZE = 300


@dataclass
class TaskBuildInputs:
    task: Any
    demos: tasks.DemoSample
    demo_ids: list[int]
    dev_rows: list[dict] | None
    dev_items: list[scoring.ChoiceItem] | None
    content_free_items: list[scoring.ChoiceItem]
    info: dict[str, Any]  # DeepThinkConfig.task

    @property
    def demos_text(self) -> str:
        return self.demos.text

    @property
    def label_words(self) -> list[str] | None:
        return self.task.label_words


def resolve_shots(task, shots_per_class: int | None) -> int:
    if shots_per_class is not None:
        return shots_per_class
    shots = tasks.default_shots(task)
    if shots is None:
        raise builder.BuildError(
            f"task {task.name!r} is not a built-in task and its task.json sets no \"shots\", "
            f"so it has no default shot count; give shots per class (--shots-per-class K).")
    return shots


def task_build_inputs(task, tokenizer, model_config, *, shots_per_class: int | None = None,
                      seed: int = 0, select_on_dev: bool = True,
                      dev_size: int = DEFAULT_DEV_SIZE, stratify_dev: bool = False,
                      dev_split: str = "train") -> TaskBuildInputs:
    """Demonstrations (the paper's shot count unless given; fitted to the model's 2L
    bound by tasks.sample_demos, never truncated), a random dev split (from train,
    disjoint from them, or from another held-out split), and the content-free queries
    of a classification task."""
    shots = resolve_shots(task, shots_per_class)
    budget = builder.max_prefix_len(model_config)
    count = (lambda text: len(builder.tokenize_demos(tokenizer, text))) if budget else None
    demos = tasks.sample_demos(task, shots, seed, max_tokens=budget, count_tokens=count)
    demo_ids = builder.tokenize_demos(tokenizer, demos.text)
    info: dict[str, Any] = {**task.to_dict(), "shots_per_class": shots, "seed": seed,
                            "demo_indices": [int(i) for i in demos.indices]}
    if demos.fit is not None:
        info["demo_fit"] = demos.fit
    dev_rows = dev_items = None
    if select_on_dev:
        dev_rows = tasks.dev_split(task, dev_size, seed, exclude=set(demos.indices),
                                   stratify=stratify_dev, split=dev_split)
        dev_items = scoring.items_from_rows(task, dev_rows)
        info.update(dev_size=len(dev_rows), dev_seed=seed, dev_stratified=stratify_dev,
                    dev_split=dev_split)
    cf_items = []
    if task.kind == tasks.CLASSIFICATION:
        cf_items = scoring.items_from_rows(task, calibration.content_free_rows(task))
    return TaskBuildInputs(task, demos, demo_ids, dev_rows, dev_items, cf_items, info)
