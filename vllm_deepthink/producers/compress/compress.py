"""`compress_adapter`: any adapter of L positions -> an ordinary adapter of k < L.

1. The queries (token ids, no special tokens) are split into train and dev (seeded).
2. Selection (selection.py) on the train queries: k positions per layer and KV head,
   the sink kept; their keys rotated by -(L-k) (positions.py).
3. Optionally distillation (distill.py) toward a teacher (teachers.py).
4. The dev agreement and KL of the result against the teacher are measured (also
   without distillation), the source's label_calibration is recomputed for the
   compressed prefix, and the adapter of method "compressed" records all of it
   (DeepThinkConfig.compression).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from vllm_deepthink.format import (COMPRESSED, AdapterFormatError, DeepThinkAdapter,
                                   DeepThinkConfig, ModelFingerprint, check_fingerprint,
                                   torch_dtype)
from vllm_deepthink.producers.compress import positions, selection, teachers
from vllm_deepthink.producers.compress.distill import DistillSettings, evaluate
from vllm_deepthink.producers.compress.distill import distill as run_distill
from vllm_deepthink.producers.compress.queries import queries_digest
from vllm_deepthink.producers.deepthink.builder import builder_version
from vllm_deepthink.tasks import calibration, scoring

MAX_DEV = 64


class CompressError(ValueError):
    """A compression that cannot run; the message says why and how to fix it."""


def resolve_prefix_len(source_len: int, prefix_len: int | None = None,
                       ratio: float | None = None) -> int:
    """k from prefix_len or ratio (k = round(L / ratio)), checked: 2 <= k < L."""
    if (prefix_len is None) == (ratio is None):
        raise CompressError("give exactly one of `prefix_len` (k positions) or `ratio` (L / k)")
    if ratio is not None:
        if not ratio > 1:
            raise CompressError(f"`ratio` must be > 1 (k = L / ratio < L), found {ratio!r}")
        prefix_len = int(round(source_len / ratio))
    try:
        selection.check_prefix_len(prefix_len, source_len)
    except selection.SelectionError as exc:
        raise CompressError(str(exc)) from None
    return prefix_len


def split_queries(count: int, dev_size: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(train, dev) indices: dev_size (default min(64, count // 4)) queries held out."""
    if count < 2:
        raise CompressError(f"queries: at least 2 are needed (train and dev), found {count}")
    dev_size = min(MAX_DEV, max(1, count // 4)) if dev_size is None else dev_size
    if not 1 <= dev_size < count:
        raise CompressError(f"`dev_size` must be in [1, {count - 1}] for {count} queries, "
                            f"found {dev_size}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order[dev_size:], order[:dev_size]


def answer_ids(tokenizer, source_calibration, choices) -> list[int] | None:
    """The answer tokens, one per label in label order: the label's token when each is
    one token, else each label's first token when those differ; None otherwise. A label's
    probability after the query is its first token's times the rest's given that token,
    so the first tokens decide between the labels, and a bias on a first token scales its
    label's probability alone."""
    if source_calibration and source_calibration.get("label_token_ids"):
        return list(source_calibration["label_token_ids"])
    if choices:  # as the query is followed (label_words are kept without their space)
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        first = [i[0] for i in ids if i]
        if len(first) == len(ids) and len(set(first)) == len(first):
            return first
    return None


def _choice_ids(tokenizer, source_calibration, choices) -> list[list[int]] | None:
    if choices:
        return [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    token_ids = (source_calibration or {}).get("label_token_ids")
    return [[t] for t in token_ids] if token_ids else None


def recompute_label_calibration(model, tokenizer, source_calibration, prefix,
                                dev_ids, choice_ids, batch_size: int = 16
                                ) -> tuple[dict[str, Any] | None, str]:
    """The source's label_calibration recomputed with `prefix`: dev-prior over the dev
    queries, content-free over the recorded inputs; and what was done."""
    if not source_calibration:
        return None, "the source has none"
    if not choice_ids:
        return None, ("dropped: the labels are not one token each and no choices were given "
                      "(compress from the task to recompute it)")

    def prior(query_ids):
        plan = scoring.make_plan([scoring.EncodedItem(list(q), choice_ids) for q in query_ids])
        return calibration.log_prior(scoring.score_plan(model, plan, past_key_values=prefix,
                                                        batch_size=batch_size))

    out = {key: source_calibration.get(key) for key in ("label_words", "label_token_ids")}
    out["dev-prior"] = {"log_prior": prior(dev_ids), "n": len(dev_ids)}
    content_free = source_calibration.get("content-free")
    if content_free and content_free.get("inputs"):
        inputs = content_free["inputs"]
        out["content-free"] = {
            "log_prior": prior([tokenizer(q, add_special_tokens=False)["input_ids"]
                                for q in inputs]), "inputs": inputs}
    return out, "recomputed for the compressed prefix (dev-prior over the dev queries)"


def _source_digest(adapter: DeepThinkAdapter) -> str:
    return adapter.digest or hashlib.sha256(adapter.to_safetensors_bytes()).hexdigest()


def _make_teacher(teacher, adapter, source_prefix, calibration_prior,
                  answers) -> teachers.Teacher:
    if isinstance(teacher, teachers.Teacher):
        return teacher
    if teacher == "source":
        return teachers.source_teacher(source_prefix)
    if teacher == "calibrated":
        return teachers.calibrated_teacher(source_prefix, adapter.config.label_calibration,
                                           calibration_prior, answers)
    raise CompressError(f"`teacher` must be 'source', 'calibrated' or a teachers.Teacher (e.g. "
                        f"teachers.ensemble_teacher of several seeds), found {teacher!r}")


def compress_adapter(adapter: DeepThinkAdapter, model, tokenizer, queries: Sequence[str], *,
                     prefix_len: int | None = None, ratio: float | None = None,
                     distill: DistillSettings | None = None,
                     teacher: str | teachers.Teacher = "source",
                     calibration_prior: str = "content-free",
                     choices: Sequence[str] | None = None, dev_size: int | None = None,
                     seed: int = 0, batch_size: int = 16,
                     queries_info: dict[str, Any] | None = None,
                     build_args: dict[str, Any] | None = None, progress: bool = True,
                     attention_cache: dict | None = None,
                     on_step: Callable[[dict[str, Any]], None] | None = None
                     ) -> DeepThinkAdapter:
    """Compress `adapter` (any method) to k positions for `queries` (rendered query texts;
    labels never used) with `model` (the adapter's base model) and its tokenizer.

    k: `prefix_len`, or round(L / `ratio`). Without `distill` (DistillSettings):
    selection only. `teacher` of the distillation: "source", "calibrated" (needs the
    source's label_calibration; `calibration_prior` picks its prior) or a
    teachers.Teacher (teachers.ensemble_teacher: several demonstration seeds, with
    `calibrated=True` each draw's own label prior divided out). `choices`:
    the task's label strings (answer tokens for the agreement, and label_calibration for
    multi-token labels). `attention_cache`: a dict kept by a caller compressing the same
    source for the same queries to several k (the selection's attention pass runs once).
    Returns the new adapter (not saved) of method "compressed".
    """
    start = time.perf_counter()
    source = adapter.config
    try:
        check_fingerprint(source, ModelFingerprint.from_model(model), "the source adapter")
    except AdapterFormatError as exc:
        raise CompressError(str(exc)) from None
    try:
        positions.check_movable(model.config)
    except positions.PositionsError as exc:
        raise CompressError(str(exc)) from None
    L = source.prefix_len
    k = resolve_prefix_len(L, prefix_len, ratio)
    if not (isinstance(teacher, str) and teacher == "source") and distill is None:
        name = teacher.name if isinstance(teacher, teachers.Teacher) else teacher
        raise CompressError(f"teacher {name!r} is a distillation teacher; give distill "
                            f"(DistillSettings) or use teacher 'source'")
    if distill is not None:
        try:
            distill.check()
        except ValueError as exc:
            raise CompressError(str(exc)) from None
    queries = list(queries)
    query_ids = [list(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in queries]
    empty = [i for i, q in enumerate(query_ids) if not q]
    if empty:
        raise CompressError(f"queries {empty[:5]} tokenize to no tokens; every query needs one")
    train, dev = split_queries(len(queries), dev_size, seed)
    train_ids, dev_ids = [query_ids[i] for i in train], [query_ids[i] for i in dev]
    source_prefix = list(zip(adapter.keys, adapter.values))
    words = (source.label_calibration or {}).get("label_words")
    if words and choices and [w.strip() for w in words] != [c.strip() for c in choices]:
        raise CompressError(f"`choices` {list(choices)} are not the labels of the source's "
                            f"label_calibration {list(words)} (in that order)")
    answers = answer_ids(tokenizer, source.label_calibration, choices)
    try:
        the_teacher = _make_teacher(teacher, adapter, source_prefix, calibration_prior,
                                    answers)
        teachers.check_answer_ids(the_teacher, answers)
    except teachers.TeacherError as exc:
        raise CompressError(str(exc)) from None
    if distill is not None:
        try:
            distill = distill.resolved(answers)
        except ValueError as exc:
            raise CompressError(str(exc)) from None
    top_k = distill.top_k if distill else 64
    positions_mode = (distill or DistillSettings()).resolved(answers).positions

    def targets(ids):
        return teachers.teacher_targets(model, the_teacher, ids, top_k=top_k,
                                        answer_ids=answers, batch_size=batch_size,
                                        progress=progress)

    # Attention scores do not depend on k: a caller compressing one source to several
    # k for the same queries passes the same `attention_cache` and scores them once.
    cache_key = (_source_digest(adapter), queries_digest([str(q) for q in train_ids]))
    cached = attention_cache.get(cache_key) if attention_cache is not None else None
    try:
        if cached is None:
            selection.check_prefix_len(k, L)
            cached = selection.attention_scores(model, source_prefix, train_ids,
                                                batch_size=batch_size, progress=progress)
            if attention_cache is not None:
                attention_cache[cache_key] = cached
        kept = selection.select(model, source_prefix, train_ids, k, scores=cached)
    except selection.SelectionError as exc:
        raise CompressError(str(exc)) from None
    keys = positions.shift_keys(
        model, [t.float() for t in selection.gather_positions(adapter.keys, kept)], L)
    values = [t.float() for t in selection.gather_positions(adapter.values, kept)]
    selection_seconds = time.perf_counter() - start
    train_targets = None
    if the_teacher.query_priors and the_teacher.prefix_bias is None:
        # Each prefix's own label prior, from the train queries (labels unused), in the
        # same run of the teacher as their targets; the dev targets need the priors.
        the_teacher, train_targets = teachers.priors_and_targets(
            model, the_teacher, train_ids, top_k=top_k, answer_ids=answers,
            batch_size=batch_size, progress=progress)
    dev_targets = targets(dev_ids)
    selected_dev = evaluate(model, list(zip(keys, values)), dev_ids, dev_targets,
                            answer_ids=answers, positions=positions_mode,
                            batch_size=batch_size)
    distill_record = None
    final_dev = selected_dev
    if distill is not None:
        if train_targets is None:
            train_targets = targets(train_ids)
        result = run_distill(model, keys, values, train_ids, train_targets, dev_ids,
                             dev_targets, distill, answer_ids=answers,
                             progress=progress, on_step=on_step)
        keys, values = result.keys, result.values
        best = next(e for e in result.trace if e["step"] == result.best_step)
        final_dev = {"kl": best["dev_kl"], "agreement": best["dev_agreement"], "n": len(dev)}
        distill_record = {"settings": distill.to_dict(), "teacher": the_teacher.info,
                          "best_step": result.best_step, "stopped": result.stopped,
                          "steps_run": result.trace[-1]["step"],
                          "seconds": round(result.seconds, 3), "trace": result.trace}
    dtype = torch_dtype(source.dtype)
    keys = [t.detach().to("cpu", dtype).contiguous() for t in keys]
    values = [t.detach().to("cpu", dtype).contiguous() for t in values]
    label_calibration, calibration_note = recompute_label_calibration(
        model, tokenizer, source.label_calibration, list(zip(keys, values)), dev_ids,
        _choice_ids(tokenizer, source.label_calibration, choices), batch_size)
    source_digest = _source_digest(adapter)
    record = {
        "source_method": source.method, "source_digest": source_digest,
        "source_prefix_len": L, "prefix_len": k, "ratio": round(L / k, 4),
        "source_config_digest": source.digest(),
        "selection": {"method": selection.METHOD, "sink": selection.SINK,
                      "rotation": f"keys rotated by -(L-k) = -{L - k} with the model's RoPE",
                      "queries": len(train), "seconds": round(selection_seconds, 3),
                      "positions": kept.tolist()},
        "queries": {"digest": queries_digest(queries), "count": len(queries),
                    "train": len(train), "dev": len(dev), "seed": seed,
                    **({"info": queries_info} if queries_info else {})},
        "distill": distill_record,
        "dev": {"teacher": the_teacher.name if distill else "source",
                "answer_token_ids": answers, "selection": selected_dev,
                "final": final_dev},
        "label_calibration": calibration_note,
        "seconds": round(time.perf_counter() - start, 3),
    }
    config = DeepThinkConfig(
        base_model_name_or_path=source.base_model_name_or_path,
        fingerprint=source.fingerprint, prefix_len=k, dtype=source.dtype, method=COMPRESSED,
        num_virtual_tokens=k, prefix_special_ids=[],
        provenance={"source": "compress", "files": {"source adapter weights": source_digest}},
        label_calibration=label_calibration, task=source.task,
        build_args=dict(build_args or {}), builder_version=builder_version(),
        compression=record)
    try:
        config.validate("compressed adapter config")
    except AdapterFormatError as exc:
        raise CompressError(str(exc)) from None
    return DeepThinkAdapter(config=config, keys=keys, values=values)
