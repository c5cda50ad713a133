"""Task rows from the `datasets` library: a hub dataset or local json/csv/parquet files.

    --dataset glue:sst2                 load_dataset("glue", "sst2")
    --dataset SetFit/sst5               load_dataset("SetFit/sst5")
    --dataset data/reviews.csv          load_dataset("csv", data_files=...) (json, jsonl,
                                        csv, parquet; a directory holds train.* / test.* /
                                        validation.* files, one per split)

The task itself (template, label words, which columns hold the text and the label) is a
`task.json` as for task directories, with these keys for datasets:

    "text_column": "sentence"           classification input (default "text")
    "label_column": "label"             integer label, or a string among label_words
    "question_column", "choices_column" multiple choice (defaults "question", "choices")
    "splits": {"test": "validation"}    our split -> the dataset's split name
    "dataset": "glue:sst2"              the default SPEC when --dataset is not given

Label words default to the names of the label column's `ClassLabel` feature when the
dataset has one. Rows become `{"text"|"question", "choices", "label"}` like the jsonl
rows of a task directory, validated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_deepthink.tasks.task import (
    CLASSIFICATION,
    MULTIPLE_CHOICE,
    SPLITS,
    TASK_FILE,
    TASK_JSON_KEYS,
    Task,
    TaskError,
    task_from_spec,
)

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_KEYS = {"text_column", "label_column", "question_column", "choices_column", "splits",
                "dataset"}


@dataclass(frozen=True)
class DatasetSpec:
    """What to hand to `datasets.load_dataset`."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None

    @classmethod
    def parse(cls, spec: str, *, local_paths: bool = True) -> DatasetSpec:
        """`local_paths=False`: SPEC is a hub name even if a path of that name exists."""
        local = Path(spec).expanduser()
        if local_paths and local.is_file():
            builder = _builder(local)
            return cls(builder, data_files={"train": str(local)})
        if local_paths and local.is_dir():
            files = {}
            for path in sorted(local.iterdir()):
                if path.stem in SPLITS and path.suffix in _FILE_BUILDERS:
                    if path.stem in files:
                        raise TaskError(f"{local}: two files for split {path.stem!r}; keep one")
                    files[path.stem] = str(path)
            if not files:
                raise TaskError(
                    f"{local}: no train/validation/test file with a suffix in "
                    f"{sorted(_FILE_BUILDERS)}; expected e.g. train.csv and test.csv.")
            builders = {_builder(Path(f)) for f in files.values()}
            if len(builders) > 1:
                raise TaskError(f"{local}: split files of different formats {sorted(builders)}")
            return cls(builders.pop(), data_files=files)
        path, _, name = spec.partition(":")
        if not path:
            raise TaskError(f"`dataset` {spec!r}: expected NAME[:CONFIG] (a hub dataset such as "
                            f"glue:sst2) or a local json/csv/parquet file or directory")
        return cls(path, name or None)


def _builder(path: Path) -> str:
    if path.suffix not in _FILE_BUILDERS:
        raise TaskError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                        f"{sorted(_FILE_BUILDERS)}")
    return _FILE_BUILDERS[path.suffix]


def load_dataset_task(spec: str | None, task_config: str | Path,
                      revision: str | None = None) -> Task:
    """A Task whose rows come from a dataset: `task_config` is its task.json (or a
    directory holding one; a local dataset directory may hold it too), `spec` the
    dataset (None: the task.json's "dataset")."""
    import json

    config_path = Path(task_config).expanduser()
    if config_path.is_dir():
        config_path = config_path / TASK_FILE
    if not config_path.is_file():
        raise TaskError(f"{config_path}: missing; a dataset task needs a {TASK_FILE} with its "
                        f"template and columns (see vllm_deepthink/tasks/datasets.py).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise TaskError(f"{config_path}: expected a JSON object")
    unknown = sorted(set(config) - TASK_JSON_KEYS - DATASET_KEYS)
    if unknown:
        raise TaskError(f"{config_path}: unknown keys {unknown}; allowed keys are "
                        f"{sorted(TASK_JSON_KEYS | DATASET_KEYS)}.")
    if spec:
        dataset_spec = DatasetSpec.parse(spec)
    else:
        spec = config.get("dataset")
        if not spec:
            raise TaskError(f"{config_path}: no dataset: pass `dataset` or set "
                            f"\"dataset\"")
        beside = config_path.parent / spec  # a local path in a task.json: relative to it
        if beside.exists():
            spec = str(beside)
            dataset_spec = DatasetSpec.parse(spec)
        else:  # never a path relative to the working directory: a hub name
            dataset_spec = DatasetSpec.parse(spec, local_paths=False)
    kind = config.get("kind")
    splits = _load_splits(dataset_spec, config, revision)
    if kind == CLASSIFICATION and "label_words" not in config:
        names = splits.pop("__label_names__", None)
        if names is None:
            raise TaskError(f"{config_path}: 'label_words' is missing and the dataset's label "
                            f"column is not a ClassLabel with names; give label_words.")
        config = {**config, "label_words": names}
    splits.pop("__label_names__", None)
    task_keys = {k: v for k, v in config.items() if k not in DATASET_KEYS}
    if "eval_split" not in task_keys:
        task_keys["eval_split"] = "test" if "test" in splits else "validation"
    task = task_from_spec(task_keys, config_path.parent, str(config_path))
    rows = {split: _rows(task, config, split_rows, f"{spec} [{split}]")
            for split, split_rows in splits.items() if split != "__label_names__"}
    task.set_rows(rows)
    if "train" not in rows:
        raise TaskError(f"`dataset` {spec}: no train split; demonstrations are sampled from it "
                        f"(map one with \"splits\": {{\"train\": NAME}} in {TASK_FILE}).")
    if task.eval_split not in rows:
        raise TaskError(f"`dataset` {spec}: no {task.eval_split!r} split (the evaluation split); "
                        f"found {sorted(rows)}. Map one with \"splits\" in {TASK_FILE}.")
    return task


def _load_splits(spec: DatasetSpec, config: dict, revision: str | None) -> dict[str, Any]:
    try:
        import datasets
    except ImportError:
        raise TaskError("rows from a dataset (`dataset`, or a task.json naming one) need the "
                        "`datasets` library: pip install 'vllm-deepthink[datasets]'") from None
    explicit = config.get("splits") or {}
    # A dataset split feeds at most one held-out split of ours: with {"test": "validation"},
    # the dataset's validation rows are our test split only, never also our validation
    # split (from which `build --dev-split validation` would then select on test).
    mapping = {ours: ours for ours in ("validation", "test") if ours not in explicit.values()}
    mapping = {"train": "train", **mapping, **explicit}
    try:
        loaded = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files,
                                       revision=revision)
    except Exception as exc:  # the library raises many types (network, format, missing)
        raise TaskError(f"`dataset`: load_dataset({spec.path!r}, {spec.name!r}) failed: "
                        f"{type(exc).__name__}: {exc}") from None
    out: dict[str, Any] = {}
    for ours, theirs in mapping.items():
        if theirs in loaded:
            out[ours] = loaded[theirs]
    label_column = config.get("label_column", "label")
    for split in out.values():
        feature = split.features.get(label_column)
        names = getattr(feature, "names", None)
        if names:
            out["__label_names__"] = list(names)
        break
    return out


def _rows(task: Task, config: dict, split, source: str) -> list[dict]:
    """Dataset rows -> our rows ({"text"|"question", "choices", "label"} + other columns)."""
    label_column = config.get("label_column", "label")
    if task.kind == MULTIPLE_CHOICE:
        columns = {"question": config.get("question_column", "question"),
                   "choices": config.get("choices_column", "choices")}
    else:
        columns = {"text": config.get("text_column", "text")}
    missing = [c for c in (*columns.values(), label_column) if c not in split.column_names]
    if missing:
        raise TaskError(f"{source}: columns {missing} not found; the dataset has "
                        f"{split.column_names}. Set text_column / label_column (or "
                        f"question_column / choices_column) in {TASK_FILE}.")
    rows = []
    for n, record in enumerate(split):
        row = dict(record)
        for ours, theirs in columns.items():
            row[ours] = record[theirs]
        label = record[label_column]
        if isinstance(label, str) and task.label_words and label in task.label_words:
            label = task.label_words.index(label)
        row["label"] = label
        task.check_row(row, f"{source} row {n}")
        rows.append(row)
    if not rows:
        raise TaskError(f"{source}: no rows")
    return rows


def open_task(task_dir: str | Path | None, dataset: str | None = None,
              revision: str | None = None) -> Task:
    """The task of the CLIs' `--task-dir DIR [--dataset SPEC]`: DIR's jsonl files, or the
    dataset's rows with DIR's task.json (DIR may be left out when SPEC is a local
    directory holding the task.json; SPEC may be left out when DIR's task.json names
    its "dataset")."""
    from vllm_deepthink.tasks.task import load_task

    if dataset is None:
        if task_dir is None:
            raise TaskError("give `task_dir` (a directory: train.jsonl, ...) or `dataset`")
        if _names_a_dataset(Path(task_dir).expanduser() / TASK_FILE):
            return load_dataset_task(None, task_dir, revision=revision)
        return load_task(task_dir)
    config = task_dir
    if config is None:
        local = Path(dataset).expanduser()
        if not (local.is_dir() and (local / TASK_FILE).is_file()):
            raise TaskError(f"`dataset` {dataset}: needs a {TASK_FILE} (template, label words, "
                            f"columns): pass `task_dir`, the directory holding it")
        config = local
    return load_dataset_task(dataset, config, revision=revision)


def _names_a_dataset(task_file: Path) -> bool:
    import json

    try:
        spec = json.loads(task_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no (readable) task.json: load_task says what is wrong
    return isinstance(spec, dict) and spec.get("dataset") is not None
