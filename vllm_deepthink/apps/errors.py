"""`UsageError`: the one error of a command's input, printed the same way for every
command by apps/cli.py (`vllm-deepthink COMMAND: error: MESSAGE`)."""

from __future__ import annotations


class UsageError(Exception):
    """Input a command cannot use: what was expected, what was found, how to fix it.

    A library error names its parameters in backticks (`task_id`); apps/cli.py writes
    each as the command's flag (--task-id), so one message serves a Python caller and
    the command line."""
