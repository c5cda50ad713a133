"""`evaluate_task`: one evaluation, from a model, a task and an adapter to the JSON of
`eval --output-json` (report.py): it opens the task, loads the adapter, builds the
scorer and runs `evaluate` in every mode. It is what `vllm-deepthink eval` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.eval.calibrate import calibration_items
from vllm_deepthink.apps.eval.evaluate import evaluate
from vllm_deepthink.apps.eval.modes import ADAPTER_NAME, MODES, check_modes, max_prompt_len
from vllm_deepthink.apps.eval.report import SCHEMA_VERSION, adapter_summary
from vllm_deepthink.apps.eval.scorers import load_adapter_for, make_scorer


def evaluate_task(model: str | Path, *, task_dir: str | Path | None = None,
                  dataset: str | None = None, adapter: str | Path | None = None,
                  modes: Sequence[str] | None = None, engine: str = "vllm",
                  split: str | None = None, limit: int | None = None, seed: int = 0,
                  calibrate: str = "none", dev_size: int = 300, dev_split: str = "train",
                  batch_size: int = 16, block_size: int = 32, progress: bool = True
                  ) -> dict[str, Any]:
    """Accuracy of `modes` (default: all three with `adapter`, else zero-shot) on the
    task of `task_dir` and/or `dataset`, `split` (default the task's) or `limit` items
    of it drawn with `seed`, scored by `engine` ("vllm" or "hf"; `block_size`: vLLM's KV
    block size; `batch_size`: the HF engine's sequences per forward). `calibrate`
    (tasks.calibration.METHODS) adds calibrated metrics (calibrate.py). Raises EvalError
    or tasks.TaskError for input it cannot use."""
    from transformers import AutoTokenizer

    from vllm_deepthink.tasks import eval_rows
    from vllm_deepthink.tasks.datasets import open_task

    modes = check_modes(modes, adapter is not None) if modes is not None else (
        list(MODES) if adapter is not None else ["zero-shot"])
    task = open_task(task_dir, dataset)
    split = split or task.eval_split
    rows = eval_rows(task, split, limit, seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    loaded = load_adapter_for(model, adapter) if adapter else None
    calibration_rows = None
    if calibrate != "none":
        calibration_rows = calibration_items(task, tokenizer, calibrate, loaded, dev_size,
                                             seed, dev_split, evaluated=split)
    needed = max_prompt_len(tokenizer, task, rows, loaded, modes,
                            extra_items=calibration_rows[0] if calibration_rows else ())
    dirs = {ADAPTER_NAME: adapter} if "deepthink" in modes else {}
    engine_kwargs = {"block_size": block_size} if engine == "vllm" else {}
    scorer = make_scorer(engine, model, {ADAPTER_NAME: loaded} if loaded else {}, dirs,
                         needed, batch_size, progress=progress, **engine_kwargs)
    try:
        result = evaluate(scorer, tokenizer, task, rows, modes, loaded, progress=progress,
                          calibrate=calibrate, calibration_rows=calibration_rows)
    finally:
        scorer.close()
    settings = {"model": str(model), "task_dir": str(task_dir) if task_dir else None,
                "dataset": dataset, "task": task.to_dict(), "split": split, "limit": limit,
                "seed": seed, "engine": engine, "modes": modes, "block_size": block_size,
                "calibrate": calibrate, "adapter": str(adapter) if adapter else None,
                "adapter_config": adapter_summary(loaded)}
    return {"schema_version": SCHEMA_VERSION, "settings": settings, **result}
