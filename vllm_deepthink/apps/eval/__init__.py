"""`vllm-deepthink eval`: accuracy of zero-shot, ICL and Deep-Thinking on a task (cli.py
over run.evaluate_task)."""
