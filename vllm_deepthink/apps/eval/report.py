"""The output of an evaluation: the table printed and the JSON of `eval --output-json`.

JSON (schema_version 2):
  settings:         model, task_dir, dataset, task (tasks.Task.to_dict()), split, limit, seed,
                    engine, modes, adapter (path or null), adapter_config (prefix_len,
                    selected_iteration, iterations_run, optimizer, optimizer_params,
                    position_mode, demos_text)
  prefix_tokens:    {mode: tokens before the query (0/1 for zero-shot, L otherwise)}
  metrics:          {mode: {"acc", "acc_norm", "n"}}; acc ranks choices by summed
                    logprob, acc_norm by mean logprob per token
  predictions:      {mode: [argmax choice index by summed logprob, per item]}
  predictions_norm: {mode: [argmax choice index by mean logprob, per item]}
  labels:           [gold choice index, per item]  (items in eval-split file order)
  choice_tokens:    [[tokens of each choice], per item]
  scores:           {mode: [[summed logprob of each choice], per item]}
  seconds:          {mode: scoring wall time}
  calibration:      null, or {"method", "log_prior": {mode: [...]},
                    "log_prior_norm": {mode: [...]} (from mean-per-token scores),
                    "inputs": [content-free queries] or "dev_size": n,
                    "scores": {mode: [[...]]} (the content-free / dev per-choice scores)};
                    metrics[mode] then holds acc_calibrated / acc_norm_calibrated and
                    predictions_calibrated {mode: [...]} the calibrated argmax
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2


def table_title(output: dict[str, Any]) -> str:
    """The table's title: task, split, items, model, engine."""
    s = output["settings"]
    return (f"{s['task']['name']} ({s['split']}, n={len(output['labels'])}), model "
            f"{s['model']}, engine {s['engine']}")


def format_table(title: str, result: dict[str, Any]) -> str:
    calibrated = result.get("calibration") is not None
    head = f"{'mode':<10} {'acc':>7} {'acc_norm':>9}"
    if calibrated:
        head += f" {'acc_cal':>8}"
    lines = [title, head + f" {'n':>6} {'prefix':>7} {'sec':>7}"]
    for mode, m in result["metrics"].items():
        line = f"{mode:<10} {m['acc']:>7.4f} {m['acc_norm']:>9.4f}"
        if calibrated:
            line += f" {m['acc_calibrated']:>8.4f}"
        lines.append(line + f" {m['n']:>6} {result['prefix_tokens'][mode]:>7} "
                            f"{result['seconds'][mode]:>7.1f}")
    if calibrated:
        lines.append(f"acc_cal: calibrated with {result['calibration']['method']}")
    return "\n".join(lines)


def adapter_summary(adapter) -> dict[str, Any] | None:
    if adapter is None:
        return None
    c = adapter.config
    return {"prefix_len": c.prefix_len, "selected_iteration": c.selected_iteration,
            "iterations_run": c.iterations_run, "optimizer": c.optimizer,
            "optimizer_params": c.optimizer_params, "position_mode": c.position_mode,
            "demos_text": c.demos_text}
