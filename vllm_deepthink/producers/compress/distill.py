"""Distillation of a compressed prefix: gradients through the frozen model into the k
positions' K/V only.

Loss: KL(teacher || compressed) of the next-token distributions at the queries'
positions, with the teacher's sparse targets (teachers.py). `positions`:
  all     every query position (the whole next-token distribution: generation too);
  last    each query's last position, the answer position (whole distribution);
  answer  the answer position over the answer tokens only (renormalized): the
          classification decision itself, which is what selection loses; the cheapest;
  auto    "answer" when the answer tokens are known (one per label: its token, or its
          first token when the labels begin differently; compress.answer_ids), else "all".

Adam on float32 copies of the K/V; every `eval_every` steps the dev queries give the KL
and the agreement (the compressed prefix's answer equals the teacher's: argmax over the
answer tokens when given, else over the vocabulary, at each dev query's last position);
the evaluation of lowest dev KL is kept and `patience` evaluations without a lower one
stop the run.
Every step is in the trace.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_deepthink.producers.compress.batches import batch_indices, forward_after_prefix
from vllm_deepthink.producers.compress.teachers import Targets
from vllm_deepthink.tasks import scoring

POSITIONS = ("auto", "all", "last", "answer")


@dataclass
class DistillSettings:
    """steps: Adam steps (one batch each); lr: Adam's learning rate; batch_size: queries
    per step; eval_every: steps between dev evaluations; patience: evaluations without a
    better dev result before stopping (0: never); top_k: teacher tokens kept per position;
    positions: where the KL is taken ("auto", "all", "last", "answer": the module's
    docstring); seed: batch order."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    eval_every: int = 10
    patience: int = 3
    top_k: int = 64
    positions: str = "auto"
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "top_k"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, found {value!r}")
        if type(self.patience) is not int or self.patience < 0:
            raise ValueError(f"`patience` must be an integer >= 0, found {self.patience!r}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, found {self.lr!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS}, found {self.positions!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self, answer_ids: Sequence[int] | None) -> DistillSettings:
        """These settings with `positions` "auto" made concrete for `answer_ids`."""
        if self.positions == "auto":
            return replace(self, positions="answer" if answer_ids else "all")
        if self.positions == "answer" and not answer_ids:
            raise ValueError("`positions` 'answer' needs the answer tokens (one token per "
                             "label: give the task's choices), found none; use 'all' or "
                             "'last'")
        return self


@dataclass
class DistillResult:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    trace: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    stopped: str = ""
    seconds: float = 0.0


def sparse_kl(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """[N] KL(teacher || student) per position over the teacher's kept tokens plus one
    bucket for all others; logits [N, vocab] of the student."""
    logq_all = torch.log_softmax(logits.float(), dim=-1)
    logq = logq_all.gather(1, targets.ids)
    logq_rest = torch.logsumexp(logq_all.scatter(1, targets.ids, -torch.inf), dim=-1)
    p, p_rest = targets.logp.exp(), targets.log_rest.exp()
    kept = torch.where(p > 0, p * (targets.logp - logq), torch.zeros_like(p)).sum(dim=-1)
    rest = torch.where(p_rest > 0, p_rest * (targets.log_rest - logq_rest),
                       torch.zeros_like(p_rest))
    return kept + rest


def _batch_targets(targets: Sequence[Targets], last_only: bool) -> Targets:
    parts = [Targets(t.ids[-1:], t.logp[-1:], t.log_rest[-1:]) if last_only else t
             for t in targets]
    return Targets(torch.cat([t.ids for t in parts]), torch.cat([t.logp for t in parts]),
                   torch.cat([t.log_rest for t in parts]))


def answer_logp(target: Targets, answer_ids: Sequence[int]) -> torch.Tensor:
    """[A] the teacher's log-probs at the answer position over `answer_ids`, renormalized
    (the answer tokens are always among its kept tokens: teachers.teacher_targets)."""
    ids, logp = target.ids[-1].tolist(), target.logp[-1]
    picked = torch.stack([logp[ids.index(int(a))] for a in answer_ids])
    return torch.log_softmax(picked.float(), dim=-1)


def answer_kl(logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """[B] KL(teacher || student) over the answer tokens; logits [B, A] of the student
    at the answer tokens, teacher_logp [B, A] (renormalized)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(dim=-1)


def _loss(model, prefix, query_ids, targets, positions: str,
          answer_ids: Sequence[int] | None = None):
    """(mean KL over the positions, student logits [B, vocab or A] at the last positions:
    over the answer tokens A for "answer")."""
    run = forward_after_prefix(model, prefix, query_ids)
    if positions == "all":
        logits = run.logits(model)  # [N, vocab]
        kl = sparse_kl(logits, _batch_targets(targets, False).to_device(logits.device))
        return kl.mean(), logits[run.last_rows()]
    hidden = run.hidden[run.valid][run.last_rows()]  # [B, hidden]: the LM head only here
    if positions == "last":
        logits = scoring.lm_logits(model, hidden)  # [B, vocab]
        kl = sparse_kl(logits, _batch_targets(targets, True).to_device(logits.device))
        return kl.mean(), logits
    ids = torch.tensor(list(answer_ids), device=hidden.device)
    logits = scoring.lm_logits(model, hidden, token_ids=ids)  # [B, A]
    teacher = torch.stack([answer_logp(t, answer_ids) for t in targets]).to(logits.device)
    return answer_kl(logits, teacher).mean(), logits


def _teacher_answer(target: Targets, answer_ids: Sequence[int] | None) -> int:
    ids, logp = target.ids[-1], target.logp[-1]
    if not answer_ids:
        return int(ids[logp.argmax()])
    dense = {int(i): float(lp) for i, lp in zip(ids, logp)}
    return max(answer_ids, key=lambda a: (dense.get(int(a), -float("inf")), -answer_ids.index(a)))


def _student_answers(logits: torch.Tensor, answer_ids: Sequence[int] | None) -> list[int]:
    """The student's answers from its last-position logits [B, vocab] (or [B, A] over the
    answer tokens)."""
    if not answer_ids:
        return logits.argmax(dim=-1).tolist()
    if logits.shape[-1] == len(answer_ids):
        return [answer_ids[i] for i in logits.argmax(dim=-1).tolist()]
    ids = torch.tensor(list(answer_ids), device=logits.device)
    return ids[logits[:, ids].argmax(dim=-1)].tolist()


@torch.no_grad()
def evaluate(model, prefix, query_ids: Sequence[Sequence[int]], targets: Sequence[Targets], *,
             answer_ids: Sequence[int] | None = None, positions: str = "all",
             batch_size: int = 16) -> dict[str, float]:
    """{"kl": mean over the queries' KL, "agreement": the share of queries whose answer
    equals the teacher's, "n"} of a prefix (per layer (key, value))."""
    kls, agree = [], 0
    for rows in batch_indices(len(query_ids), batch_size):
        kl, last_logits = _loss(model, prefix, [query_ids[i] for i in rows],
                                [targets[i] for i in rows], positions, answer_ids)
        kls.append(kl.item() * len(rows))
        answers = _student_answers(last_logits, answer_ids)
        agree += sum(a == _teacher_answer(targets[i], answer_ids) for a, i in zip(answers, rows))
    n = len(query_ids)
    return {"kl": sum(kls) / n, "agreement": agree / n, "n": n}


def distill(model, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
            train_ids: Sequence[Sequence[int]], train_targets: Sequence[Targets],
            dev_ids: Sequence[Sequence[int]], dev_targets: Sequence[Targets],
            settings: DistillSettings, *, answer_ids: Sequence[int] | None = None,
            progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None
            ) -> DistillResult:
    """Adam on the K/V (per layer [num_kv_heads, k, head_dim]) against the teacher's
    targets; returns the best evaluated K/V (float32) and the trace (step 0: the start)."""
    settings.check()
    settings = settings.resolved(answer_ids)
    if not train_ids or not dev_ids:
        raise ValueError(f"distillation needs train and dev queries, found {len(train_ids)} "
                         f"and {len(dev_ids)}")
    start = time.perf_counter()
    params = [t.detach().float().clone().requires_grad_(True) for t in (*keys, *values)]
    n = len(keys)
    frozen = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    rng = random.Random(settings.seed)
    order: list[int] = []
    trace: list[dict[str, Any]] = []

    def prefix():
        return list(zip(params[:n], params[n:]))

    def dev_entry(step: int, entry: dict[str, Any]) -> dict[str, Any]:
        metrics = evaluate(model, prefix(), dev_ids, dev_targets, answer_ids=answer_ids,
                           positions=settings.positions, batch_size=settings.batch_size)
        entry.update(dev_kl=metrics["kl"], dev_agreement=metrics["agreement"])
        return entry

    try:
        with torch.inference_mode(False), torch.enable_grad():
            optimizer = torch.optim.Adam(params, lr=settings.lr)
            best_entry = dev_entry(0, {"step": 0, "seconds": 0.0})
            trace.append(best_entry)
            result = DistillResult([p.detach().clone() for p in params[:n]],
                                   [p.detach().clone() for p in params[n:]])
            waited, stopped = 0, "steps"
            bar = tqdm(range(1, settings.steps + 1), desc="distill", unit="step",
                       disable=not progress, leave=False)
            for step in bar:
                if len(order) < settings.batch_size:
                    more = list(range(len(train_ids)))
                    rng.shuffle(more)
                    order.extend(more)
                rows, order[:] = order[:settings.batch_size], order[settings.batch_size:]
                loss, _ = _loss(model, prefix(), [train_ids[i] for i in rows],
                                [train_targets[i] for i in rows], settings.positions,
                                answer_ids)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                entry = {"step": step, "loss": loss.item(),
                         "seconds": round(time.perf_counter() - start, 3)}
                if step % settings.eval_every == 0 or step == settings.steps:
                    dev_entry(step, entry)
                    # The KL, not the agreement: a share of a few dozen dev answers moves
                    # in coarse steps and stops a run that is still learning.
                    better = entry["dev_kl"] < best_entry["dev_kl"]
                    if better:
                        best_entry, waited = entry, 0
                        result.keys = [p.detach().clone() for p in params[:n]]
                        result.values = [p.detach().clone() for p in params[n:]]
                    else:
                        waited += 1
                    bar.set_postfix(dev_agreement=f"{entry['dev_agreement']:.3f}",
                                    dev_kl=f"{entry['dev_kl']:.4f}")
                trace.append(entry)
                if on_step is not None:
                    on_step(entry)
                if settings.patience and waited >= settings.patience:
                    stopped = "patience"
                    break
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        model.train(was_training)
    result.trace, result.best_step, result.stopped = trace, best_entry["step"], stopped
    result.seconds = time.perf_counter() - start
    return result
