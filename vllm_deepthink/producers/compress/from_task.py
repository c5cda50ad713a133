"""Compression with its inputs resolved: `CompressSettings` (k, the queries, the teacher,
the distillation), `compress_for_task` (an adapter compressed for a task's train rows or
given queries, what `vllm-deepthink compress` runs) and `build_compressed_from_task` (a
Deep-Thinking build, then its compression: `vllm-deepthink build --prefix-len K`).

Queries drawn from a task are its train rows rendered with its template (labels unused),
never the source's demonstration rows; the task also gives the label choices (answer
tokens, label_calibration) and the demonstrations of an ensemble teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.producers.compress import queries as q
from vllm_deepthink.producers.compress import teachers
from vllm_deepthink.producers.compress.compress import (CompressError, compress_adapter,
                                                        resolve_prefix_len)
from vllm_deepthink.producers.compress.distill import DistillSettings
from vllm_deepthink.producers.deepthink import builder
from vllm_deepthink.producers.deepthink.from_task import (LoadedModel, build_from_task,
                                                          build_summary, load_base_model,
                                                          task_build_inputs)

TEACHERS = ("source", "calibrated")
PRIORS = ("content-free", "dev-prior")


@dataclass
class CompressSettings:
    """How an adapter is compressed (`compress_for_task`, `build_compressed_from_task`).

    prefix_len / ratio: k, or k = round(L / ratio); exactly one.
    queries: the query texts (rendered as the adapter is queried) to compress for;
        None: `num_queries` train rows of the task, drawn with `seed` (labels unused,
        the source's demonstration rows excluded). queries_info: what `queries` are, for
        the record (e.g. {"source": "file", "file": ...}).
    dev_size: queries held out for the agreement and early stopping (default
        min(64, queries / 4)).
    distill: DistillSettings, or None for selection only.
    teacher: "source" or "calibrated" (its prior: `calibration_prior`, "content-free" or
        "dev-prior"); teacher_seeds: the ensemble teacher of these demonstration seeds
        (needs the task); with teacher "calibrated", each draw's own label prior, over
        the train queries, is divided out before they are averaged. Both but "source"
        need `distill`.
    seed: query draw and dev split; batch_size: queries per scoring batch.
    """

    prefix_len: int | None = None
    ratio: float | None = None
    queries: list[str] | None = None
    queries_info: dict[str, Any] | None = None
    num_queries: int = q.DEFAULT_COUNT
    dev_size: int | None = None
    distill: DistillSettings | None = None
    teacher: str = "source"
    calibration_prior: str = "content-free"
    teacher_seeds: list[int] | None = None
    seed: int = 0
    batch_size: int = 16

    def check(self, has_task: bool) -> None:
        """Everything checkable before the source exists (k < L is checked against it by
        `resolve`); CompressError names the parameter."""
        if (self.prefix_len is None) == (self.ratio is None):
            raise CompressError("give exactly one of `prefix_len` (k positions) or `ratio` "
                                "(L / k)")
        if self.prefix_len is not None and type(self.prefix_len) is not int:
            raise CompressError(f"`prefix_len` must be an integer, found {self.prefix_len!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool)
                                       or not isinstance(self.ratio, (int, float))):
            raise CompressError(f"`ratio` must be a number, found {self.ratio!r}")
        if self.queries is not None and (not isinstance(self.queries, list) or not all(
                isinstance(text, str) for text in self.queries)):
            raise CompressError("`queries` must be a list of query texts")
        if self.teacher_seeds is not None and (not isinstance(self.teacher_seeds, list) or
                                               not all(type(s) is int
                                                       for s in self.teacher_seeds)):
            raise CompressError(f"`teacher_seeds` must be a list of integers, found "
                                f"{self.teacher_seeds!r}")
        if self.queries is None and not has_task:
            raise CompressError(
                "no queries to compress for: without a task (`task_dir` / `dataset`, whose "
                "train rows give them) give `queries`, the query texts as the adapter is "
                "queried (e.g. --queries FILE, one per line)")
        if self.queries is not None and not self.queries:
            raise CompressError("`queries` is empty; give at least 2 query texts")
        if type(self.num_queries) is not int or self.num_queries < 2:
            raise CompressError(f"`num_queries` must be an integer >= 2, found "
                                f"{self.num_queries!r}")
        if self.teacher not in TEACHERS:
            raise CompressError(f"`teacher` must be one of {TEACHERS}, found {self.teacher!r}")
        if self.calibration_prior not in PRIORS:
            raise CompressError(f"`calibration_prior` must be one of {PRIORS}, found "
                                f"{self.calibration_prior!r}")
        chosen = [name for name, on in (("`teacher` calibrated", self.teacher != "source"),
                                        ("`teacher_seeds`", self.teacher_seeds is not None))
                  if on]
        if chosen and self.distill is None:
            raise CompressError(f"{' and '.join(chosen)} choose a distillation teacher; "
                                f"add `distill`")
        if self.teacher_seeds is not None and not has_task:
            raise CompressError("`teacher_seeds` draws demonstrations from the source's "
                                "task: give `task_dir` / `dataset`")
        if self.distill is not None:
            try:
                self.distill.check()
            except ValueError as exc:
                raise CompressError(str(exc)) from None

    def resolve(self, source_len: int) -> int:
        """k for a source of `source_len` positions (2 <= k < L), else CompressError."""
        return resolve_prefix_len(source_len, self.prefix_len, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for a record: the queries as their count (their digest is in the
        compression record)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["distill"] = self.distill.to_dict() if self.distill else None
        if self.queries is not None:
            data["queries"] = {"count": len(self.queries)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "compress") -> CompressSettings:
        """From a JSON object (a manifest line's "compress"): the fields above, `distill`
        true (the defaults) or an object of DistillSettings' fields; ValueError naming
        `where` for an unknown field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; expected some of "
                             f"{sorted(fields)}")
        data = dict(data)
        distill = data.get("distill")
        if distill is True:
            data["distill"] = DistillSettings()
        elif isinstance(distill, dict):
            known = {f.name for f in dataclasses.fields(DistillSettings)}
            wrong = sorted(set(distill) - known)
            if wrong:
                raise ValueError(f"{where}: distill: unknown field {wrong[0]!r}; expected some "
                                 f"of {sorted(known)}")
            data["distill"] = DistillSettings(**distill)
        elif distill not in (None, False):
            raise ValueError(f"{where}: \"distill\" must be true, false or an object of "
                             f"DistillSettings' fields, found {distill!r}")
        else:
            data["distill"] = None
        return cls(**data)


def compress_for_task(adapter: DeepThinkAdapter, model, tokenizer, settings: CompressSettings,
                      *, task=None, build_args: dict[str, Any] | None = None,
                      progress: bool = True,
                      on_step: Callable[[dict[str, Any]], None] | None = None
                      ) -> DeepThinkAdapter:
    """`adapter` compressed (compress_adapter) with `settings`: for `settings.queries`, or
    else the train rows of `task` (a tasks.Task; not the rows of the adapter's recorded
    demonstrations), the label choices taken from `task`. Raises CompressError."""
    settings.check(has_task=task is not None)
    try:
        if settings.queries is not None:
            texts = list(settings.queries)
            info = settings.queries_info or {"source": "given"}
        else:
            exclude = (adapter.config.task or {}).get("demo_indices", [])
            texts, info = q.task_queries(task, settings.num_queries, settings.seed, exclude)
        teacher = settings.teacher
        if settings.teacher_seeds is not None:
            teacher = teachers.ensemble_teacher(model, tokenizer, task, adapter,
                                                settings.teacher_seeds,
                                                calibrated=settings.teacher == "calibrated")
    except (q.QueriesError, teachers.TeacherError) as exc:
        raise CompressError(str(exc)) from None
    try:
        return compress_adapter(
            adapter, model, tokenizer, texts, prefix_len=settings.prefix_len,
            ratio=settings.ratio, distill=settings.distill, teacher=teacher,
            calibration_prior=settings.calibration_prior,
            choices=q.task_choices(task) if task is not None else None,
            dev_size=settings.dev_size, seed=settings.seed, batch_size=settings.batch_size,
            queries_info=info, build_args=build_args, progress=progress, on_step=on_step)
    except teachers.TeacherError as exc:
        raise CompressError(str(exc)) from None


def _source_len(base: LoadedModel, task, demos_text: str | None,
                shots_per_class: int | None, seed: int) -> int | None:
    """L of the adapter the build will make (its demonstrations' token count), known before
    the weights load; None when the build's own checks will refuse the sources."""
    if demos_text is not None:
        return None if task is not None else len(builder.tokenize_demos(base.tokenizer,
                                                                        demos_text))
    if task is None:
        return None
    inputs = task_build_inputs(task, base.tokenizer, base.config,
                               shots_per_class=shots_per_class, seed=seed, select_on_dev=False)
    return len(inputs.demo_ids)


def build_compressed_from_task(model: str | Path | LoadedModel, *, compress: CompressSettings,
                               task_dir: str | Path | None = None, dataset: str | None = None,
                               demos_text: str | None = None, revision: str | None = None,
                               shots_per_class: int | None = None, seed: int = 0,
                               dtype: str = "float32", build_args: dict[str, Any] | None = None,
                               progress: bool = True,
                               on_step: Callable[[dict[str, Any]], None] | None = None,
                               **build: Any) -> DeepThinkAdapter:
    """A Deep-Thinking adapter built (build_from_task with these arguments and `build`,
    e.g. `iterations` through `policy`, `search`), then compressed with `compress`
    (compress_for_task: the queries are the task's train rows, not the demonstrations,
    unless `compress.queries` is given). Returns the compressed adapter (method
    "compressed"; not saved); its build_args record the build's arguments, `compress`
    and what the build chose (`source_build`). Everything, k < L included, is checked
    before the weights load; raises CompressError, BuildError, tasks.TaskError or
    HubResolutionError."""
    from vllm_deepthink.tasks.datasets import open_task

    has_task = bool(task_dir or dataset)
    compress.check(has_task=has_task)
    if dtype != "float32":
        # Selection and distillation run on the float32 model, and an adapter built in
        # another dtype records the fingerprint of that dtype's embedding.
        raise CompressError(f"`dtype` {dtype} with `compress`: a compressed build runs in "
                            f"float32; build in float32 (the adapter keeps float32 K/V)")
    base = model if isinstance(model, LoadedModel) else load_base_model(model, revision, dtype)
    task = open_task(task_dir, dataset) if has_task else None
    source_len = _source_len(base, task, demos_text, shots_per_class, seed)
    if source_len is not None:
        compress.resolve(source_len)
    recorded = {**(build_args or {}), "compress": compress.to_dict()}
    source = build_from_task(base, task_dir=task_dir, dataset=dataset, demos_text=demos_text,
                             revision=revision, shots_per_class=shots_per_class, seed=seed,
                             dtype=dtype, build_args=recorded, progress=progress, **build)
    summary = build_summary(source.config)
    recorded["source_build"] = {key: summary[key] for key in (
        "prefix_len", "iterations_run", "selected_iteration", "optimizer", "optimizer_params",
        "position_mode")}
    return compress_for_task(source, base.weights(), base.tokenizer, compress,
                             task=task, build_args={**source.config.build_args, **recorded},
                             progress=progress, on_step=on_step)
