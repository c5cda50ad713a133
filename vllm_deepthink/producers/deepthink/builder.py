"""The Deep-Thinking build: demonstrations in, the adapter of the selected iteration out.

iteration.py runs the meta-optimizer, dev_scoring.py scores each iteration on the dev
split, candidates.py runs the candidates and chooses the kept iteration; build_adapter
puts them together and adapter_from_selection writes the adapter.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig, ModelFingerprint, dtype_name
from vllm_deepthink.producers.deepthink import search
from vllm_deepthink.producers.deepthink.candidates import Selection, choose, run_candidates
from vllm_deepthink.producers.deepthink.dev_scoring import DevSet, label_calibration
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.iteration import check_build_supported, optimizer_params
from vllm_deepthink.producers.deepthink.search import Candidate
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy


def builder_version() -> str:
    try:
        return importlib.metadata.version("vllm-deepthink")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def tokenize_demos(tokenizer, demos_text: str) -> list[int]:
    """Demo token ids WITH the tokenizer's special tokens (BOS), as the published code."""
    return list(tokenizer(demos_text, add_special_tokens=True)["input_ids"])


def adapter_from_selection(model, demos_text: str, demo_ids: Sequence[int],
                           selection: Selection, *, dev: DevSet | None = None,
                           label_words: Sequence[str] | None = None,
                           task: dict[str, Any] | None = None,
                           build_args: dict[str, Any] | None = None,
                           base_model_name_or_path: str | None = None) -> DeepThinkAdapter:
    run = selection.run
    config = DeepThinkConfig(
        base_model_name_or_path=str(base_model_name_or_path
                                    or getattr(model.config, "_name_or_path", "") or ""),
        fingerprint=ModelFingerprint.from_model(model),
        prefix_len=len(demo_ids),
        dtype=dtype_name(selection.keys[0].dtype),
        demos_text=demos_text,
        demo_token_ids=[int(i) for i in demo_ids],
        optimizer=run.candidate.optimizer,
        optimizer_params=dict(run.candidate.params),
        position_mode=run.candidate.position_mode,
        iterations_run=run.iterations_run,
        selected_iteration=selection.iteration,
        selection_trace=run.trace,
        selection=selection.summary,
        label_calibration=label_calibration(dev, selection.dev, label_words),
        task=task,
        build_args=dict(build_args or {}),
        builder_version=builder_version(),
    )
    return DeepThinkAdapter(config=config,
                            keys=[k.detach().cpu().contiguous() for k in selection.keys],
                            values=[v.detach().cpu().contiguous() for v in selection.values])


def build_adapter(model, tokenizer, demos_text: str, *, iterations: int = 15,
                  demo_ids: Sequence[int] | None = None,
                  optimizer: str = "momentum", step_size: float = search.DEFAULT_STEP_SIZE,
                  beta: float = search.DEFAULT_BETA, eta: float = search.DEFAULT_EMA_ETA,
                  position_mode: str = "published", candidates: Sequence[Candidate] | None = None,
                  dev_items: Sequence[Any] | None = None,
                  content_free_items: Sequence[Any] = (),
                  policy: SelectionPolicy | None = None, patience: int | None = None,
                  label_words: Sequence[str] | None = None,
                  task: dict[str, Any] | None = None, build_args: dict[str, Any] | None = None,
                  base_model_name_or_path: str | None = None, score_batch_size: int = 16,
                  progress: bool = True,
                  on_iteration: Callable[[dict[str, Any]], None] | None = None
                  ) -> DeepThinkAdapter:
    """Run Deep-Thinking and return the adapter of the selected iteration.

    One candidate (optimizer, its parameters, position_mode) or `candidates` (a
    search, e.g. search.search_grid()). With dev_items (scoring.ChoiceItem list) every
    iteration is scored on them and selection.py's protocol picks the run and the
    iteration (`policy`; default: SelectionPolicy(max_iterations=iterations,
    patience=patience, min_iterations=1, collapse_drop=None), i.e. every iteration
    runs unless `patience` says otherwise; the guard still applies). Without dev_items
    the last iteration of the only candidate is kept. `on_iteration` gets each trace
    entry, with "candidate" (its name) added. `demo_ids` (default: demos_text tokenized
    with special tokens) are the demonstration ids themselves, for demos that are ids.
    """
    demo_ids = list(demo_ids) if demo_ids is not None else tokenize_demos(tokenizer, demos_text)
    if candidates is None:
        candidates = [Candidate(optimizer, optimizer_params(optimizer, step_size, beta, eta),
                                position_mode)]
    check_build_supported(model.config, len(demo_ids), candidates[0].position_mode)
    if policy is None:
        if patience is not None and (patience < 1 or not dev_items):
            raise BuildError("patience needs dev items (select on dev) and must be >= 1, "
                             f"found patience={patience} with {len(dev_items or [])} dev items")
        policy = SelectionPolicy(max_iterations=iterations, min_iterations=1,
                                 patience=patience, collapse_drop=None)
    dev = (DevSet.from_items(tokenizer, dev_items, content_free_items, score_batch_size)
           if dev_items else None)

    def report(run, iteration, keys, values, entry, result):
        if on_iteration is not None:
            on_iteration({**entry, "candidate": run.candidate.name})

    runs, icl = run_candidates(model, demo_ids, candidates, dev, policy, progress=progress,
                               on_iteration=report)
    selection = choose(runs, icl, policy)
    return adapter_from_selection(model, demos_text, demo_ids, selection, dev=dev,
                                  label_words=label_words, task=task, build_args=build_args,
                                  base_model_name_or_path=base_model_name_or_path)
