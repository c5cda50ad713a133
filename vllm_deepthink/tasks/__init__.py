"""Tasks and choice scoring with HF transformers (never imports vLLM).

- task.py: task directories (`train.jsonl`, eval splits, `task.json`), the built-in
  Deep-Thinking prompt templates and shot counts.
- demonstrations.py: demonstration sampling (fitted to a token budget).
- splits.py: dev splits and evaluation rows.
- datasets.py: task rows from the `datasets` library, and `open_task`.
- scoring.py: the choice-scoring plan every scorer follows and the HF scorer.
- calibration.py: label calibration (content-free, dev-prior) of choice scores.
- stats.py: paired tests and bootstrap intervals.
"""

from vllm_deepthink.tasks.demonstrations import DemoSample, sample_demos
from vllm_deepthink.tasks.splits import dev_indices, dev_split, dev_split_of, eval_rows
from vllm_deepthink.tasks.task import (
    BUILTIN_TASKS,
    CLASSIFICATION,
    DEFAULT_SHOTS,
    MULTIPLE_CHOICE,
    Task,
    TaskError,
    default_shots,
    load_task,
)

__all__ = ["BUILTIN_TASKS", "CLASSIFICATION", "DEFAULT_SHOTS", "MULTIPLE_CHOICE", "DemoSample",
           "Task", "TaskError", "default_shots", "dev_indices", "dev_split", "dev_split_of",
           "eval_rows", "load_task", "sample_demos"]
