"""A Deep-Thinking build from a task (`build_from_task`, what `vllm-deepthink build`
runs): the model resolved, the demonstrations (fitted to the model), the dev split and
the content-free queries with the record of how they were made (`task_build_inputs`),
the candidates, then the builder.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink import tasks
from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.producers.deepthink import builder, iteration
from vllm_deepthink.producers.deepthink import search as search_grid
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
from vllm_deepthink.tasks import calibration, scoring

DEFAULT_DEV_SIZE = 300
# The values of build_from_task's choice parameters (the flags of `build` offer the same).
SELECT_ON = ("dev", "none")
DTYPES = ("float32", "bfloat16", "float16")


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
        raise BuildError(
            f"task {task.name!r} is not a built-in task and its task.json sets no \"shots\", "
            f"so it has no default shot count; give `shots_per_class`.")
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
    budget = iteration.max_prefix_len(model_config)
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


# ----------------------------------------------------------------- the whole build

def candidates(model_config, *, search: bool = False, optimizer: str | None = None,
               step_size: float | None = None, beta: float | None = None,
               eta: float | None = None, position_mode: str | None = None
               ) -> list[search_grid.Candidate]:
    """The candidates a build runs: the grid of search.py with `search`, else one (the
    published default where a parameter is not given)."""
    explicit = [f"`{name}`" for name, value in (
        ("optimizer", optimizer), ("step_size", step_size), ("beta", beta), ("eta", eta),
        ("position_mode", position_mode)) if value is not None]
    if search:
        if explicit:
            raise BuildError(f"`search` selects the optimizer on dev; drop "
                             f"{', '.join(explicit)}")
        return search_grid.search_grid(search_grid.position_modes(model_config))
    optimizer = optimizer or "momentum"
    mode = position_mode or search_grid.PUBLISHED.position_mode
    if optimizer == "momentum":
        if eta is not None:
            raise BuildError("`eta` belongs to `optimizer` ema; with momentum use "
                             "`step_size` / `beta`")
        params = {"step_size": search_grid.DEFAULT_STEP_SIZE if step_size is None
                  else step_size,
                  "beta": search_grid.DEFAULT_BETA if beta is None else beta}
    else:
        if step_size is not None or beta is not None:
            raise BuildError("`step_size` / `beta` belong to `optimizer` momentum; "
                             "with ema use `eta`")
        params = {"eta": search_grid.DEFAULT_EMA_ETA if eta is None else eta}
    return [search_grid.Candidate(optimizer, params, mode)]


def check_sources(*, demos_text: str | None, task_dir, dataset, shots_per_class: int | None,
                  select_on: str | None, search: bool, dev_size: int, dev_split: str) -> str:
    """Where a build's demonstrations come from, checked; returns `select_on` ("dev" by
    default from a task, else "none")."""
    from_task = bool(task_dir or dataset)
    if demos_text is not None and from_task:
        raise BuildError(
            "give the demonstrations as `demos_text`, or a task to sample them from "
            "(`task_dir` and/or `dataset`), not both")
    if demos_text is None and not from_task:
        raise BuildError(
            "no demonstrations: give `task_dir` (and/or `dataset`) to sample them from a "
            "task, or `demos_text` with the exact demonstration string")
    if from_task:
        if shots_per_class is not None and shots_per_class < 1:
            raise BuildError(f"`shots_per_class` must be >= 1, found {shots_per_class}")
        if task_dir and not Path(task_dir).is_dir():
            raise BuildError(f"`task_dir` {task_dir}: no such directory")
    else:
        if shots_per_class is not None:
            raise BuildError("`shots_per_class` applies to a task (`task_dir` / "
                             "`dataset`), not `demos_text`")
        if select_on == "dev":
            raise BuildError("`select_on` dev needs a task (`task_dir` / `dataset`): "
                             "the dev split comes from its training rows")
    select_on = select_on or ("dev" if from_task else "none")
    if search and select_on != "dev":
        raise BuildError("`search` needs `select_on` dev (with `task_dir` / "
                         "`dataset`): candidates are compared on dev")
    if dev_size < 1:
        raise BuildError(f"`dev_size` must be >= 1, found {dev_size}")
    if dev_split != "train" and select_on != "dev":
        raise BuildError(f"`dev_split` {dev_split} applies to `select_on` dev, which "
                         f"this build does not use")
    return select_on


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


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


def format_plan(demo_ids, runs, policy, select_on: str, dev_items, search: bool) -> str:
    what = f"search ({len(runs)} candidates)" if search else runs[0].name
    return (f"demonstrations: {len(demo_ids)} tokens; up to {policy.max_iterations} "
            f"iterations, {what}, select on {select_on}"
            + (f" ({len(dev_items)} dev items, min {policy.min_iterations} iterations, "
               f"patience {policy.patience}, guard {policy.guard_k:g} SE)" if dev_items
               else ""))


def build_summary(config, out: str | Path | None = None) -> dict[str, Any]:
    """What a build chose (the JSON of `build --output-json`)."""
    return {"out": None if out is None else str(out), "prefix_len": config.prefix_len,
            "iterations_run": config.iterations_run,
            "selected_iteration": config.selected_iteration, "optimizer": config.optimizer,
            "optimizer_params": config.optimizer_params, "position_mode": config.position_mode,
            "selection_trace": config.selection_trace, "selection": config.selection,
            "label_calibration": config.label_calibration}


@dataclass
class LoadedModel:
    """A base model opened once for many builds (`load_base_model`): its directory, the
    name adapters record, its HF config and tokenizer, and its weights, loaded on first
    use (`weights()`), so a build checks everything before they load."""
    directory: Path
    name: str
    revision: str | None
    dtype: str
    config: Any
    tokenizer: Any
    _weights: Any = None

    def weights(self):
        if self._weights is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._weights = AutoModelForCausalLM.from_pretrained(
                self.directory, dtype=getattr(torch, self.dtype))
            self._weights.eval()
        return self._weights


def load_base_model(model: str | Path, revision: str | None = None,
                    dtype: str = "float32") -> LoadedModel:
    """`model` (a directory, or a hub id at `revision`) resolved, its config and tokenizer
    read; the weights load on the first `weights()`."""
    from transformers import AutoConfig, AutoTokenizer

    from vllm_deepthink.producers.base_model import resolve_model

    model_dir, model_name = resolve_model(model, revision)
    return LoadedModel(model_dir, model_name, revision, dtype,
                       AutoConfig.from_pretrained(model_dir),
                       AutoTokenizer.from_pretrained(model_dir))


def build_from_task(model: str | Path | LoadedModel, *, task_dir: str | Path | None = None,
                    dataset: str | None = None, demos_text: str | None = None,
                    revision: str | None = None, shots_per_class: int | None = None,
                    seed: int = 0, search: bool = False, optimizer: str | None = None,
                    step_size: float | None = None, beta: float | None = None,
                    eta: float | None = None, position_mode: str | None = None,
                    policy: SelectionPolicy | None = None, select_on: str | None = None,
                    dev_size: int = DEFAULT_DEV_SIZE, dev_split: str = "train",
                    stratify_dev: bool = False, batch_size: int = 16, dtype: str = "float32",
                    build_args: dict[str, Any] | None = None, progress: bool = True
                    ) -> DeepThinkAdapter:
    """A Deep-Thinking adapter of `model` (a directory, or a hub id at `revision`, or a
    LoadedModel of load_base_model opened for many builds at that revision and dtype), built
    from the task of `task_dir` and/or `dataset` (demonstrations sampled and fitted to
    the model, the iteration chosen on a dev split: task_build_inputs) or from the exact
    `demos_text` (the last iteration kept), with the candidates of `candidates()` under
    `policy` (default SelectionPolicy()). Everything is checked before the weights load;
    `progress` reports the plan, every scored iteration (and a bar) and the choice on
    stderr. Raises BuildError, tasks.TaskError or format.hub.HubResolutionError for input
    it cannot use. The adapter is not saved (`save_pretrained`)."""
    import torch

    from vllm_deepthink.tasks.datasets import open_task

    select_on = check_sources(demos_text=demos_text, task_dir=task_dir, dataset=dataset,
                              shots_per_class=shots_per_class, select_on=select_on,
                              search=search, dev_size=dev_size, dev_split=dev_split)
    policy = policy or SelectionPolicy()
    if isinstance(model, LoadedModel):
        for param, wanted, opened in (("revision", revision, model.revision),
                                      ("dtype", dtype, model.dtype)):
            if wanted != opened:
                raise BuildError(f"`{param}` {wanted} differs from the {opened} the "
                                 f"base model was opened with (load_base_model)")
        base = model
    else:
        base = load_base_model(model, revision, dtype)
    config, tokenizer = base.config, base.tokenizer
    runs = candidates(config, search=search, optimizer=optimizer, step_size=step_size,
                      beta=beta, eta=eta, position_mode=position_mode)
    inputs = None
    if demos_text is None:
        inputs = task_build_inputs(open_task(task_dir, dataset), tokenizer, config,
                                   shots_per_class=shots_per_class, seed=seed,
                                   select_on_dev=select_on == "dev", dev_size=dev_size,
                                   stratify_dev=stratify_dev, dev_split=dev_split)
        demos_text = inputs.demos_text
        fit = inputs.demos.fit
        if progress and fit and fit["replaced"]:
            _log(f"demonstrations: the first draw was {fit['tokens_first_draw']} tokens, "
                 f"over this model's {fit['max_tokens']}; replaced {len(fit['replaced'])} of "
                 f"them by shorter rows of the same label ({fit['tokens']} tokens)")
    dev_items = inputs.dev_items if inputs is not None else None
    demo_ids = builder.tokenize_demos(tokenizer, demos_text)
    for c in runs:  # before the weights load
        iteration.check_build_supported(config, len(demo_ids), c.position_mode)
    if progress:
        _log(format_plan(demo_ids, runs, policy, select_on, dev_items, search))
    recorded = dict(build_args or {})
    recorded.update(select_on=select_on, policy=policy.to_dict(),
                    candidates=[c.to_dict() for c in runs])
    with torch.inference_mode():
        adapter = builder.build_adapter(
            base.weights(), tokenizer, demos_text, candidates=runs,
            dev_items=dev_items if select_on == "dev" else None,
            content_free_items=inputs.content_free_items if inputs is not None else [],
            policy=policy, label_words=inputs.label_words if inputs is not None else None,
            task=inputs.info if inputs is not None else None,
            build_args=json.loads(json.dumps(recorded, default=str)),
            base_model_name_or_path=base.name, score_batch_size=batch_size, progress=progress,
            on_iteration=(lambda entry: _log(format_entry(entry))) if progress else None)
    if progress:
        _log(format_selection(adapter.config.selection))
    return adapter
