"""Tasks and choice scoring with HF transformers (never imports vLLM).

- task.py: task directories (`train.jsonl`, eval splits, `task.json`), the built-in
  Deep-Thinking prompt templates, demonstration sampling and dev splits.
- scoring.py: the choice-scoring plan every scorer follows and the HF scorer.
"""

from vllm_deepthink.tasks.task import (
    BUILTIN_TASKS,
    CLASSIFICATION,
    MULTIPLE_CHOICE,
    DemoSample,
    Task,
    TaskError,
    dev_split,
    eval_rows,
    load_task,
    sample_demos,
)

__all__ = ["BUILTIN_TASKS", "CLASSIFICATION", "MULTIPLE_CHOICE", "DemoSample", "Task",
           "TaskError", "dev_split", "eval_rows", "load_task", "sample_demos"]
