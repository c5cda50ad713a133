"""Teachers of the distillation and their targets.

A teacher is one or more prefixes (per-layer K/V) whose next-token distributions,
averaged as probabilities, the compressed prefix learns to reproduce at every query
position:

- `source`: the source adapter itself.
- `calibrated`: the source with its label prior divided out at the answer position
  (each query's last token): the source's label_calibration turned into
  tasks.calibration.logit_bias and added to the label tokens' logits there, so the
  compressed adapter carries the calibration and a client needs no logit_bias.
- `ensemble` (`ensemble_teacher`): the prefixes of several demonstration draws of the
  source's task, each made with the source's own recipe (its Deep-Thinking optimizer,
  position mode and selected iteration; the source itself for its own seed).
- `ensemble-calibrated` (`ensemble_teacher(..., calibrated=True)`): the same draws, each
  with its own label prior divided out at the answer position before they are
  averaged. A draw other than the source has no recorded prior, so every draw's prior is
  estimated the same way, on the compressor's train queries (`priors_and_targets`: the mean
  of its answer distributions over them, labels unused, as tasks.calibration's dev-prior).

Targets are sparse: per position the teacher's `top_k` tokens (the answer tokens always
among them at the answer position) and the log of the rest's mass, so the teacher runs
once and the KL of the coarsened distributions is exact (distill.sparse_kl).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_deepthink.producers.compress.batches import KV, batch_indices, forward_after_prefix

class TeacherError(ValueError):
    """A teacher that cannot be built from what was given."""


@dataclass
class Teacher:
    """prefixes: each per layer (key, value) [num_kv_heads, L_s, head_dim];
    answer_bias: {token id: bias} added at each query's last position; info: the record."""

    name: str
    prefixes: list[list[KV]]
    answer_bias: dict[int, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Per prefix {token id: bias} at the answer position, before the prefixes are
    # averaged; `query_priors`: the compressor sets them from its train queries first.
    prefix_bias: list[dict[int, float]] | None = None
    query_priors: bool = False


@dataclass
class Targets:
    """One query's sparse teacher distribution: at each of its S positions the log-probs
    `logp` [S, K] of tokens `ids` [S, K] and `log_rest` [S], the log of the other
    tokens' mass."""

    ids: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor

    def to_device(self, device) -> Targets:
        return Targets(self.ids.to(device), self.logp.to(device), self.log_rest.to(device))


def source_teacher(prefix: list[KV]) -> Teacher:
    return Teacher("source", [prefix], info={"name": "source"})


def calibrated_teacher(prefix: list[KV], label_calibration: dict[str, Any] | None,
                       prior: str = "content-free",
                       answer_ids: Sequence[int] | None = None) -> Teacher:
    """The source with its `prior` ("content-free" or "dev-prior") label prior divided
    out at the answer position, on the label tokens (`answer_ids`: compress.answer_ids,
    each label's first token when labels are longer; default the calibration's
    label_token_ids)."""
    from vllm_deepthink.tasks import calibration

    token_ids = list(answer_ids or (label_calibration or {}).get("label_token_ids") or [])
    if not label_calibration or not token_ids:
        found = ("has none" if not label_calibration else
                 "has one, but its labels have no answer tokens (not one token each, and "
                 "their first tokens are not all different)")
        raise TeacherError(
            "teacher 'calibrated' needs the source's label_calibration and one answer token "
            "per label (a Deep-Thinking adapter built from a classification task whose "
            f"labels are one token each or begin with different tokens); the source {found}. "
            f"Use teacher 'source'.")
    if prior not in label_calibration:
        raise TeacherError(
            f"teacher 'calibrated': the source's label_calibration has no {prior!r} prior "
            f"(it has {sorted(k for k in label_calibration if k.endswith('prior') or '-' in k)}); "
            f"choose one of those.")
    log_prior = label_calibration[prior]["log_prior"]
    if len(log_prior) != len(token_ids):
        raise TeacherError(f"teacher 'calibrated': the {prior!r} prior has {len(log_prior)} "
                           f"labels but there are {len(token_ids)} answer tokens")
    bias = calibration.logit_bias(token_ids, log_prior)
    return Teacher("calibrated", [prefix], answer_bias=bias,
                   info={"name": "calibrated", "prior": prior, "log_prior": log_prior,
                         "label_token_ids": token_ids})


def ensemble_teacher(model, tokenizer, task, source, seeds: Sequence[int],
                     calibrated: bool = False) -> Teacher:
    """The ensemble teacher of `seeds`: one demonstration draw of the source's task per
    seed (the source's shot count), each run through the source's recipe; the source
    adapter itself stands for its own seed. `calibrated`: each draw's own label prior
    divided out first (`calibrated_draws`)."""
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    from vllm_deepthink.producers.deepthink.iteration import deep_thinking_steps

    cfg = source.config
    record = cfg.task or {}
    if cfg.method != "deepthink" or "seed" not in record:
        raise TeacherError(
            "teacher seeds need a Deep-Thinking source built from a task (its record gives "
            "the shot count and recipe to draw other demonstrations with); this source is "
            f"method {cfg.method!r}{'' if record else ' without a task record'}.")
    if record.get("name") != task.name:
        raise TeacherError(f"teacher seeds: the source was built from task "
                           f"{record.get('name')!r}, the task given is {task.name!r}")
    if len(set(seeds)) < 2:
        raise TeacherError(f"teacher seeds: give at least two distinct seeds, found {list(seeds)}")
    prefixes, draws = [], []
    for seed in seeds:
        if seed == record["seed"]:
            prefixes.append(list(zip(source.keys, source.values)))
            draws.append({"seed": seed, "prefix_len": cfg.prefix_len, "made": "the source"})
            continue
        inputs = task_build_inputs(task, tokenizer, model.config,
                                   shots_per_class=record.get("shots_per_class"), seed=seed,
                                   select_on_dev=False)
        with torch.inference_mode():
            *_, (iteration, keys, values) = deep_thinking_steps(
                model, inputs.demo_ids, iterations=cfg.selected_iteration,
                optimizer=cfg.optimizer, position_mode=cfg.position_mode,
                **cfg.optimizer_params)
        prefixes.append([(k.clone(), v.clone()) for k, v in zip(keys, values)])
        draws.append({"seed": seed, "prefix_len": len(inputs.demo_ids),
                      "demo_indices": inputs.info["demo_indices"],
                      "made": f"{cfg.optimizer} {cfg.position_mode}, iteration {iteration}"})
    teacher = Teacher("ensemble", prefixes, info={"name": "ensemble", "seeds": list(seeds),
                                                  "draws": draws})
    return calibrated_draws(teacher) if calibrated else teacher


def calibrated_draws(teacher: Teacher) -> Teacher:
    """`teacher` (e.g. the ensemble) with each prefix's label prior to be divided out at
    the answer position; the priors come from the compressor's train queries
    (`priors_and_targets`, which compress_adapter runs)."""
    name = f"{teacher.name}-calibrated"
    return replace(teacher, name=name, query_priors=True, prefix_bias=None,
                   info={**teacher.info, "name": name, "prior": "each draw's, over the "
                         "train queries (labels unused)"})


def check_answer_ids(teacher: Teacher, answer_ids: Sequence[int] | None) -> None:
    """A teacher that divides out each prefix's own label prior needs the answer tokens."""
    if teacher.query_priors and not answer_ids:
        raise TeacherError(f"teacher {teacher.name!r} divides out each draw's label prior "
                           f"and needs one answer token per label (a classification task "
                           f"whose labels are one token each or begin with different "
                           f"tokens); use teacher 'ensemble'")


@torch.no_grad()
def teacher_targets(model, teacher: Teacher, query_ids: Sequence[Sequence[int]], *,
                    top_k: int = 64, answer_ids: Sequence[int] | None = None,
                    batch_size: int = 16, progress: bool = True) -> list[Targets]:
    """Per query its sparse targets (Targets), the teacher run once."""
    if teacher.query_priors and teacher.prefix_bias is None:
        raise TeacherError(f"teacher {teacher.name!r} needs its priors first "
                           f"(priors_and_targets)")
    forced = torch.tensor(list(answer_ids or []), dtype=torch.long)
    out: list[Targets] = []
    for logps, last, lengths in _prefix_logps(model, teacher, query_ids, batch_size,
                                              progress):
        if teacher.prefix_bias is not None:
            for logp, bias in zip(logps, teacher.prefix_bias):
                _add_bias(logp, last, bias)
        out += _sparse(_answer_biased(_mean(logps), last, teacher), last, lengths, forced,
                       top_k)
    return out


@torch.no_grad()
def priors_and_targets(model, teacher: Teacher, query_ids: Sequence[Sequence[int]], *,
                       top_k: int = 64, answer_ids: Sequence[int] | None = None,
                       batch_size: int = 16, progress: bool = True
                       ) -> tuple[Teacher, list[Targets]]:
    """For a teacher that divides out each prefix's own label prior (`query_priors`):
    the priors estimated on `query_ids` (per prefix, -log of the mean over them of its
    answer distribution renormalized over `answer_ids` at each query's last position:
    tasks.calibration's dev-prior) and these queries' targets, in one run of the
    teacher. Returns (the teacher with its `prefix_bias` set, the targets): the same as
    teacher_targets of that teacher."""
    from vllm_deepthink.tasks import calibration

    check_answer_ids(teacher, answer_ids)
    ids = torch.tensor(list(answer_ids), dtype=torch.long)
    out: list[Targets] = []
    answer_rows: list[list[torch.Tensor]] = [[] for _ in teacher.prefixes]  # [B, V] each
    for logps, last, lengths in _prefix_logps(model, teacher, query_ids, batch_size,
                                              progress):
        for rows, logp in zip(answer_rows, logps):
            rows.append(logp[last])
        # Every row but the answer rows is final now; those are replaced below.
        out += _sparse(_mean(logps), last, lengths, ids, top_k)
    answers = [torch.cat(rows) for rows in answer_rows]  # per prefix [Q, V]
    log_priors = [calibration.log_prior([[(v, 1) for v in row]
                                         for row in logp[:, ids].tolist()])
                  for logp in answers]
    biases = [calibration.logit_bias(answer_ids, lp) for lp in log_priors]
    teacher = replace(teacher, prefix_bias=biases,
                      info={**teacher.info, "log_priors": log_priors, "queries": len(query_ids)})
    every = torch.arange(len(query_ids))
    for logp, bias in zip(answers, biases):
        _add_bias(logp, every, bias)
    last_targets = _sparse(_answer_biased(_mean(answers), every, teacher), every,
                           [1] * len(query_ids), ids, top_k)
    for target, answer in zip(out, last_targets):
        target.ids[-1], target.logp[-1] = answer.ids[0], answer.logp[0]
        target.log_rest[-1] = answer.log_rest[0]
    return teacher, out


def _prefix_logps(model, teacher: Teacher, query_ids, batch_size: int, progress: bool):
    """Per batch: (per prefix the log-probs [N, V] at the batch's N valid positions, the
    answer rows `last` [B], the queries' lengths)."""
    for rows in tqdm(list(batch_indices(len(query_ids), batch_size)), desc=f"teacher "
                     f"({teacher.name})", unit="batch", disable=not progress, leave=False):
        batch = [query_ids[i] for i in rows]
        logps = []
        for prefix in teacher.prefixes:
            run = forward_after_prefix(model, prefix, batch)
            logps.append(torch.log_softmax(run.logits(model), dim=-1).cpu())  # [N, V]
        yield logps, run.last_rows().cpu(), run.valid.sum(dim=1).tolist()


def _mean(logps: list[torch.Tensor]) -> torch.Tensor:
    """The log of the mean of the prefixes' probabilities."""
    return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))


def _answer_biased(logp: torch.Tensor, last: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    if teacher.answer_bias:
        _add_bias(logp, last, teacher.answer_bias)
    return logp


def _sparse(logp: torch.Tensor, last: torch.Tensor, lengths: list[int],
            forced: torch.Tensor, top_k: int) -> list[Targets]:
    """Per query (of `lengths` rows of `logp` [N, V] each) its top_k tokens, the
    `forced` (answer) tokens always among them at its answer row."""
    rank = logp.clone()
    if len(forced):
        rank[last[:, None], forced] = torch.inf
    ids = torch.topk(rank, min(top_k, logp.shape[-1]), dim=-1).indices  # [N, K]
    kept = logp.gather(1, ids)
    log_rest = torch.logsumexp(logp.scatter(1, ids, -torch.inf), dim=-1)  # [N]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    return [Targets(ids[i:i + s], kept[i:i + s], log_rest[i:i + s])
            for i, s in zip(starts, lengths)]


def _add_bias(logp: torch.Tensor, last: torch.Tensor, bias: dict[int, float]) -> None:
    """In place: `bias` added to the log-probs [N, V] at the rows `last` [B] (the answer
    positions), which are then renormalized."""
    ids = torch.tensor(list(bias), dtype=torch.long)
    logp[last[:, None], ids] += torch.tensor(list(bias.values()), dtype=logp.dtype)
    logp[last] = torch.log_softmax(logp[last], dim=-1)
