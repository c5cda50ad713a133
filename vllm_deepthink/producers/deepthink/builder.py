"""Deep-Thinking (iterative forward tuning) with HF transformers; never imports vLLM.

Step 1 is a plain forward pass of the demonstrations (= ordinary ICL K/V). Each
later step runs the demonstrations again with the current K/V as
past_key_values (so they sit at positions L..2L-1, attend to the prefix and
causally to themselves), takes their new K/V (the last L cache positions of
every layer) and lets a meta-optimizer move the current K/V toward them, as
AlibabaResearch/DAMO-ConvAI deep-thinking/models/meta_optimizer.py does.

A build runs one candidate (optimizer, parameters, position mode) or a grid of them
(search.py), scores every iteration on a dev split (DevSet: tokenized and planned
once, tasks.scoring.score_plan), stops each run by the rules of selection.py and
keeps the dev-selected iteration. The cost of a build is its dev passes: one per
candidate per iteration, iteration 1 (plain ICL, shared by all candidates) once.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig, ModelFingerprint, dtype_name
from vllm_deepthink.format import hf_cache
from vllm_deepthink.format.hf_config import kv_geometry, max_positions, sliding_window, text_config
from vllm_deepthink.producers.deepthink import rotary, search
from vllm_deepthink.tasks import stats
from vllm_deepthink.producers.deepthink.search import Candidate
from vllm_deepthink.producers.deepthink.selection import (SelectionPolicy, StopRule, guard)

OPTIMIZERS = ("momentum", "ema")
POSITION_MODES = ("published", "aligned")

# Model types whose every decoder layer keeps a plain [batch, kv_heads, L, head_dim]
# K/V cache in transformers (no linear attention, latent attention or shared KV).
SUPPORTED_MODEL_TYPES = rotary.ROTATE_HALF_MODEL_TYPES | {"gpt2", "opt"}


class BuildError(ValueError):
    """A build that cannot run; the message says why and how to fix it."""


def builder_version() -> str:
    try:
        return importlib.metadata.version("vllm-deepthink")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ----------------------------------------------------------------- meta-optimizers

class MomentumOptimizer:
    """g = new - old; m = g on the first update, else g + beta * m; x = old + step_size * m."""

    def __init__(self, step_size: float = search.DEFAULT_STEP_SIZE,
                 beta: float = search.DEFAULT_BETA):
        self.step_size, self.beta = step_size, beta
        self.momentum: list[torch.Tensor] | None = None

    def __call__(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        grads = [n - o for o, n in zip(old, new)]
        if self.momentum is None:
            self.momentum = grads
        else:
            self.momentum = [g + self.beta * m for g, m in zip(grads, self.momentum)]
        return [o + self.step_size * m for o, m in zip(old, self.momentum)]


class EmaOptimizer:
    """x = eta * new + (1 - eta) * old."""

    def __init__(self, eta: float = search.DEFAULT_EMA_ETA):
        self.eta = eta

    def __call__(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
        return [self.eta * n + (1.0 - self.eta) * o for o, n in zip(old, new)]


def optimizer_params(optimizer: str, step_size: float = search.DEFAULT_STEP_SIZE,
                     beta: float = search.DEFAULT_BETA, eta: float = search.DEFAULT_EMA_ETA
                     ) -> dict[str, float]:
    if optimizer == "momentum":
        return {"step_size": float(step_size), "beta": float(beta)}
    if optimizer == "ema":
        return {"eta": float(eta)}
    raise BuildError(f"optimizer must be one of {OPTIMIZERS}, found {optimizer!r}")


def _make_optimizer(optimizer: str, params: dict[str, float]):
    return MomentumOptimizer(**params) if optimizer == "momentum" else EmaOptimizer(**params)


# ----------------------------------------------------------------- checks

def max_prefix_len(config) -> int | None:
    """The longest demonstration prefix L the builder accepts for this model: 2L must
    fit its positions and its sliding window (None: no bound in the config)."""
    bounds = [b for b in (max_positions(config), sliding_window(config)) if b is not None]
    return min(bounds) // 2 if bounds else None


def check_build_supported(config, prefix_len: int, position_mode: str) -> None:
    """Everything that can be checked before any forward pass; raises BuildError."""
    text = text_config(config)
    if position_mode not in POSITION_MODES:
        raise BuildError(f"position_mode must be one of {POSITION_MODES}, found {position_mode!r}")
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(
            f"model_type {text.model_type!r} ({getattr(config, 'architectures', None)}) is not "
            f"supported by the Deep-Thinking builder; supported: {sorted(SUPPORTED_MODEL_TYPES)}. "
            f"They keep one plain [kv_heads, L, head_dim] key/value cache per layer.")
    if position_mode == "aligned":
        try:
            rotary.check_invertible(config)
        except rotary.RotaryError as exc:
            raise BuildError(str(exc)) from None
    if prefix_len < 1:
        raise BuildError("the demonstrations tokenize to 0 tokens; give a non-empty demo text")
    positions, window = max_positions(config), sliding_window(config)
    _check_twice_prefix_fits(
        prefix_len, positions, f"Deep-Thinking runs them at positions {prefix_len}.."
        f"{2 * prefix_len - 1}", f"the model's {positions} positions")
    _check_twice_prefix_fits(
        prefix_len, window, f"in the later steps the last demo token (position "
        f"{2 * prefix_len - 1}) must still see the whole prefix",
        f"the sliding window of {window} tokens")


def _check_twice_prefix_fits(prefix_len: int, limit: int | None, why: str, what: str) -> None:
    """Refuse demonstrations whose 2*L exceeds `limit` tokens (None: no limit)."""
    if limit is not None and 2 * prefix_len > limit:
        raise BuildError(
            f"demonstrations are {prefix_len} tokens; {why}, so 2*L = {2 * prefix_len} must "
            f"be <= {what}. Use fewer or shorter demonstrations (at most {limit // 2} tokens).")


# ----------------------------------------------------------------- the iteration

def _check_kv_shapes(model, kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_len: int) -> None:
    num_layers, num_kv_heads, head_dim = kv_geometry(model.config)
    expected = (1, num_kv_heads, prefix_len, head_dim)
    if len(kv) != num_layers:
        raise BuildError(f"the model returned {len(kv)} cache layers, expected "
                         f"{num_layers}; this architecture is not supported")
    for i, (k, v) in enumerate(kv):
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise BuildError(
                f"layer {i}: cache K/V shapes {tuple(k.shape)}/{tuple(v.shape)}, expected "
                f"[1, num_kv_heads, L, head_dim] = {list(expected)}; this architecture's "
                f"cache is not supported")


@torch.no_grad()
def _forward_demos(model, demo_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]] | None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of the demos [1, L] after `past` (None for step 1), each [1, kv_heads, L, head_dim]."""
    prefix_len = demo_ids.shape[1]
    past_len = 0 if past is None else past[0][0].shape[-2]
    cache = None if past is None else hf_cache.cache_from_kv(past, model.config)
    mask = torch.ones(1, past_len + prefix_len, dtype=torch.long, device=demo_ids.device)
    out = model(input_ids=demo_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return hf_cache.last_positions(out.past_key_values, prefix_len)


def deep_thinking_steps(model, demo_ids: Sequence[int] | torch.Tensor, *, iterations: int,
                        optimizer: str = "momentum", step_size: float = search.DEFAULT_STEP_SIZE,
                        beta: float = search.DEFAULT_BETA, eta: float = search.DEFAULT_EMA_ETA,
                        position_mode: str = "published"
                        ) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield (iteration, keys, values) for iteration = 1..iterations.

    keys/values: per layer [num_kv_heads, L, head_dim], the K/V after that iteration
    (iteration 1 = plain forward of the demos). Only the current K/V and the
    optimizer state are kept; yielded tensors are never modified afterwards.
    """
    if iterations < 1:
        raise BuildError(f"iterations must be >= 1, found {iterations}")
    ids = torch.as_tensor(demo_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    prefix_len = ids.shape[1]
    check_build_supported(model.config, prefix_len, position_mode)
    params = optimizer_params(optimizer, step_size, beta, eta)
    optim_k, optim_v = _make_optimizer(optimizer, params), _make_optimizer(optimizer, params)
    rotations = (rotary.layer_rotations(model, prefix_len, 2 * prefix_len)
                 if position_mode == "aligned" else None)

    # The optimizer works on float32 copies (no-ops for a float32 model): with 16-bit
    # K/V, `old + 0.01 * m` would mostly round back to `old`.
    def master(tensors):
        return [t.float() for t in tensors]

    def model_dtype(tensors):
        return [t.to(dtype) for t in tensors]

    was_training = model.training
    model.eval()  # dropout off: the K/V must be deterministic
    try:
        kv = _forward_demos(model, ids, None)
        _check_kv_shapes(model, kv, prefix_len)
        dtype = kv[0][0].dtype
        keys, values = master(k for k, _ in kv), master(v for _, v in kv)
        yield 1, [k[0] for k in model_dtype(keys)], [v[0] for v in model_dtype(values)]
        for iteration in range(2, iterations + 1):
            past = list(zip(model_dtype(keys), model_dtype(values)))
            new = _forward_demos(model, ids, past)  # the demos at positions L..2L-1
            new_keys, new_values = master(k for k, _ in new), master(v for _, v in new)
            if rotations is not None:
                new_keys = rotary.rotate_keys_back(model, new_keys, prefix_len, rotations)
            keys, values = optim_k(keys, new_keys), optim_v(values, new_values)
            yield iteration, [k[0] for k in model_dtype(keys)], [v[0] for v in model_dtype(values)]
    finally:
        model.train(was_training)



# ----------------------------------------------------------------- dev scoring

@dataclass
class DevSet:
    """Dev queries tokenized and planned once (every dev pass reuses the plan).

    plan / labels: the dev items; cf_plan: the content-free queries of a
    classification task (tasks.calibration), scored at every iteration too (3 queries);
    label_token_ids: the label words' token ids when each is one token, else None.
    """

    plan: Any
    labels: list[int]
    cf_plan: Any | None = None
    cf_inputs: list[str] | None = None
    label_token_ids: list[int] | None = None
    batch_size: int = 16

    @classmethod
    def from_items(cls, tokenizer, items: Sequence[Any], content_free_items: Sequence[Any] = (),
                   batch_size: int = 16) -> DevSet:
        from vllm_deepthink.tasks import scoring

        if not items:
            raise BuildError("the dev split is empty; select on dev needs at least one item")
        encoded = scoring.encode_items(tokenizer, items)
        cf_plan = (scoring.make_plan(scoring.encode_items(tokenizer, content_free_items))
                   if content_free_items else None)
        token_ids = None
        if all(len(c) == 1 for e in encoded for c in e.choice_ids):
            first = [c[0] for c in encoded[0].choice_ids]
            if all([c[0] for c in e.choice_ids] == first for e in encoded):
                token_ids = first
        return cls(plan=scoring.make_plan(encoded), labels=[int(i.label) for i in items],
                   cf_plan=cf_plan, cf_inputs=[i.query for i in content_free_items] or None,
                   label_token_ids=token_ids, batch_size=batch_size)

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass
class DevResult:
    """One dev pass: per-choice scores, predictions and what the trace records."""

    scores: list[list[tuple[float, int]]]
    cf_scores: list[list[tuple[float, int]]] | None
    acc: float
    acc_norm: float
    counts: list[int]
    correct: list[bool]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "cf_scores": self.cf_scores, "acc": self.acc,
                "acc_norm": self.acc_norm, "counts": self.counts, "correct": self.correct,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DevResult:
        def pairs(rows):
            return None if rows is None else [[(float(s), int(n)) for s, n in r] for r in rows]

        return cls(scores=pairs(data["scores"]), cf_scores=pairs(data["cf_scores"]),
                   acc=data["acc"], acc_norm=data["acc_norm"], counts=list(data["counts"]),
                   correct=[bool(c) for c in data["correct"]], seconds=data["seconds"])

    def trace_entry(self, iteration: int) -> dict[str, Any]:
        from vllm_deepthink.tasks import calibration

        entry: dict[str, Any] = {"iteration": iteration, "dev_acc": self.acc,
                                 "dev_acc_norm": self.acc_norm, "dev_counts": self.counts,
                                 "dev_seconds": round(self.seconds, 3)}
        if self.cf_scores is not None:
            entry["cf_log_prior"] = calibration.log_prior(self.cf_scores)
        return entry


def score_dev(model, dev: DevSet, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
              ) -> DevResult:
    """Score the dev split (and the content-free queries) with keys/values as prefix
    (per layer [kv_heads, L, head_dim])."""
    from vllm_deepthink.tasks import scoring

    start = time.perf_counter()
    past = list(zip(keys, values))
    scores = scoring.score_plan(model, dev.plan, past_key_values=past, batch_size=dev.batch_size)
    cf = (scoring.score_plan(model, dev.cf_plan, past_key_values=past,
                             batch_size=dev.batch_size) if dev.cf_plan is not None else None)
    preds = scoring.predictions(scores)
    width = max(len(item) for item in scores)
    counts = [0] * width
    for p in preds:
        counts[p] += 1
    metrics = scoring.accuracy(scores, dev.labels)
    return DevResult(scores=scores, cf_scores=cf, acc=metrics["acc"],
                     acc_norm=metrics["acc_norm"], counts=counts,
                     correct=[p == y for p, y in zip(preds, dev.labels)],
                     seconds=time.perf_counter() - start)


# ----------------------------------------------------------------- runs and selection

@dataclass
class CandidateRun:
    """One candidate's run: its trace, why it stopped and its best iteration's K/V and
    dev result (the last iteration's when there is no dev split)."""

    candidate: Candidate
    trace: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    best_iteration: int = 1
    best: DevResult | None = None
    keys: list[torch.Tensor] = field(default_factory=list, repr=False)
    values: list[torch.Tensor] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def iterations_run(self) -> int:
        return len(self.trace)

    @property
    def best_dev_acc(self) -> float | None:
        return None if self.best is None else self.best.acc

    def summary(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "iterations_run": self.iterations_run,
                "best_iteration": self.best_iteration, "best_dev_acc": self.best_dev_acc,
                "stopped": self.stopped, "seconds": self.seconds, "trace": self.trace}


@dataclass
class Selection:
    """What a build keeps: the run, the iteration, the guard's numbers."""

    run: CandidateRun
    iteration: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    dev: DevResult | None
    summary: dict[str, Any]


def _check_finite(iteration: int, keys, values) -> None:
    for name, tensors in (("keys", keys), ("values", values)):
        if not all(torch.isfinite(t).all() for t in tensors):
            raise BuildError(
                f"iteration {iteration}: {name} contain NaN/Inf; the build diverged. Use a "
                f"smaller step size / eta, fewer iterations, or `dtype` float32.")


def run_candidates(model, demo_ids: Sequence[int], candidates: Sequence[Candidate],
                   dev: DevSet | None, policy: SelectionPolicy, *, progress: bool = True,
                   on_iteration: Callable[[CandidateRun, int, list, list, dict,
                                           DevResult | None], None] | None = None,
                   icl: tuple[DevResult | None, list, list] | None = None,
                   scored: Sequence[DevResult] = ()
                   ) -> tuple[list[CandidateRun], tuple[DevResult | None, list, list]]:
    """Run every candidate, each stopped by the policy's rules (StopRule) when there is
    a dev split, else run to max_iterations. Returns the runs and iteration 1's (dev
    result, keys, values): plain ICL, computed and scored once for all candidates
    (`icl`: that triple from an earlier call, e.g. when candidates run one at a time).

    `scored`: the dev results of the first iterations of the only candidate, from an
    interrupted run of it. Those iterations are run again (the K/V, which cost one
    forward over the demonstrations each) but not scored again, so the run resumes
    where its dev scoring stopped with the same trace and stopping decisions.

    on_iteration(run, iteration, keys, values, trace_entry, dev_result) is called after
    each iteration is scored (keys/values: per layer [kv_heads, L, head_dim]).
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise BuildError("no candidates to run")
    if dev is None and len(candidates) > 1:
        raise BuildError("a search over several candidates needs a dev split to select on")
    if scored and (dev is None or len(candidates) > 1):
        raise BuildError("resuming from scored iterations needs a dev split and one candidate")
    for c in candidates:
        optimizer_params(c.optimizer, **c.params)  # raises on a bad optimizer
        check_build_supported(model.config, len(demo_ids), c.position_mode)
    runs = []
    for candidate in candidates:
        run = CandidateRun(candidate)
        rule = StopRule(policy)
        start = time.perf_counter()
        steps = deep_thinking_steps(model, demo_ids, iterations=policy.max_iterations,
                                    optimizer=candidate.optimizer,
                                    position_mode=candidate.position_mode, **candidate.params)
        bar = tqdm(steps, total=policy.max_iterations, desc=candidate.name, unit="it",
                   disable=not progress, leave=False)
        try:
            for iteration, keys, values in bar:
                _check_finite(iteration, keys, values)
                if dev is None:
                    result = None
                elif iteration == 1 and icl is not None:
                    result = icl[0]  # the same plain forward for every candidate
                elif iteration <= len(scored):
                    result = scored[iteration - 1]
                else:
                    result = score_dev(model, dev, keys, values)
                if iteration == 1 and icl is None:
                    icl = (result, keys, values)
                entry = (result.trace_entry(iteration) if result is not None else
                         {"iteration": iteration, "dev_acc": None, "dev_acc_norm": None})
                if result is not None:
                    # [only T=1 right, only this iteration right]: the guard, for any k
                    entry["dev_vs_t1"] = list(stats.paired_counts(icl[0].correct,
                                                                  result.correct))
                run.trace.append(entry)
                if result is None or rule.best_iteration is None or result.acc > rule.best_acc:
                    run.best_iteration, run.best, run.keys, run.values = (iteration, result,
                                                                          keys, values)
                if on_iteration is not None:
                    on_iteration(run, iteration, keys, values, entry, result)
                if result is None:
                    stop = "max_iterations" if iteration >= policy.max_iterations else None
                else:
                    stop = rule.update(iteration, result.acc)
                    bar.set_postfix(dev_acc=f"{result.acc:.4f}", best=rule.best_iteration)
                if stop is not None:
                    run.stopped = stop
                    break
        finally:
            steps.close()
        run.seconds = time.perf_counter() - start
        runs.append(run)
    return runs, icl


def choose(runs: Sequence[CandidateRun], icl: tuple[DevResult | None, list, list],
           policy: SelectionPolicy) -> Selection:
    """The best run (highest best dev accuracy, ties to the first), kept only if it
    passes the guard against T=1; else T=1 (plain ICL). Without dev: the last
    iteration of the only run."""
    icl_dev, icl_keys, icl_values = icl
    if icl_dev is None:
        (run,) = runs
        return Selection(run, run.iterations_run, run.keys, run.values, None,
                         {"select_on": "none", "selected": run.candidate.name})
    best_index = max(range(len(runs)), key=lambda i: (runs[i].best_dev_acc, -i))
    run = runs[best_index]
    check = guard(icl_dev.correct, run.best.correct, policy.guard_k)
    summary = {"select_on": "dev", "policy": policy.to_dict(), "dev_size": len(icl_dev.correct),
               "t1_dev_acc": icl_dev.acc, "best_run": run.candidate.name,
               "best_iteration": run.best_iteration, "best_dev_acc": run.best_dev_acc,
               "guard": check}
    if run.best_iteration > 1 and check["passed"]:
        selection = Selection(run, run.best_iteration, run.keys, run.values, run.best, summary)
    else:
        selection = Selection(run, 1, icl_keys, icl_values, icl_dev, summary)
    summary["selected"] = run.candidate.name
    summary["selected_iteration"] = selection.iteration
    summary["candidates"] = [r.summary() for r in runs]
    return selection


def label_calibration(dev: DevSet | None, result: DevResult | None,
                      label_words: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The label calibration of the kept iteration (classification dev sets only):
    {"label_words", "label_token_ids", "content-free": {"log_prior", "inputs"},
    "dev-prior": {"log_prior", "n"}}; tasks.calibration explains both."""
    from vllm_deepthink.tasks import calibration

    if dev is None or result is None:
        return None
    widths = {len(item) for item in result.scores}
    if len(widths) != 1 or (result.cf_scores is None and label_words is None):
        return None
    priors = calibration.label_priors(result.scores, result.cf_scores)
    out: dict[str, Any] = {"label_words": list(label_words) if label_words else None,
                           "label_token_ids": dev.label_token_ids,
                           "dev-prior": {"log_prior": priors["dev-prior"],
                                         "n": len(result.scores)}}
    if "content-free" in priors:
        out["content-free"] = {"log_prior": priors["content-free"], "inputs": dev.cf_inputs}
    return out


# ----------------------------------------------------------------- the whole build

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
