"""Tasks: their directories and task.json, prompt templates, label words, the built-in
tasks of the Deep-Thinking paper and their shot counts (demonstrations.py samples the
demonstrations, splits.py draws dev and evaluation rows).

A task directory holds `train.jsonl` and an evaluation split (`test.jsonl` and/or
`validation.jsonl`), one JSON object per line:

- classification rows: `{"text": str, "label": int}` (more string fields are allowed
  and may be used by the template);
- multiple-choice rows: `{"question": str, "choices": [str, ...], "label": int}`.

The ten tasks of the Deep-Thinking paper are built in: a directory named sst2, sst5, mr,
agnews, trec, copa, openbookqa, qasc, hellaswag or winogrande needs no `task.json`; their
templates are the published Deep-Thinking prompts (BUILTIN_TASKS), their label words come
from the directory's verbalizers.json (e.g. examples/data/sst2). Any other directory needs
a `task.json`::

    {"kind": "classification",                      # or "multiple_choice"
     "template": "Review: {text}\\nSentiment: {label}",
     "label_words": ["negative", "positive"],      # classification only
     "separator": "\\n\\n",                          # between demos (default "\\n\\n")
     "name": "my-task",                             # default: directory name
     "eval_split": "test",                          # default: test, else validation
     "shots": 4}                                    # default demonstrations per class
                                                    # (in all for multiple choice)

A task.json may also name a `datasets` dataset and its columns instead of jsonl files
(tasks/datasets.py; `--task-dir DIR` then loads it, as `--dataset` does).

Template placeholders: `{label}` (classification) or `{choice}` (multiple choice) marks
the answer and must come after `{text}` / `{question}`; any other `{field}` before the
answer is filled from the row. The query is the template up to the answer slot with
trailing spaces removed; a continuation is those spaces + the answer + the rest of the
template, so `"Sentiment: {label}"` gives the query `"...Sentiment:"` and the
continuation `" positive"`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple_choice"
KINDS = (CLASSIFICATION, MULTIPLE_CHOICE)
SPLITS = ("train", "validation", "test")
TASK_FILE = "task.json"
DEFAULT_SEPARATOR = "\n\n"

_INPUT_SLOT = {CLASSIFICATION: "text", MULTIPLE_CHOICE: "question"}
_ANSWER_SLOT = {CLASSIFICATION: "label", MULTIPLE_CHOICE: "choice"}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
TASK_JSON_KEYS = {"kind", "template", "label_words", "separator", "name", "eval_split",
                  "shots"}


class TaskError(ValueError):
    """A task directory or row that cannot be used; the message says why and what to do."""


# The published Deep-Thinking prompts (AlibabaResearch/DAMO-ConvAI, deep-thinking/tasks/*.py):
# name -> (kind, template, split the paper evaluates on, row transform or None).
# Label words of classification tasks come from the directory's verbalizers.json.
BUILTIN_TASKS: dict[str, tuple[str, str, str, str | None]] = {
    "sst2": (CLASSIFICATION, "Review: {text}\nSentiment: {label}", "test", None),
    "sst5": (CLASSIFICATION, "Review: {text}\nSentiment: {label}", "validation", None),
    "mr": (CLASSIFICATION, "Review: {text}\nSentiment: {label}", "validation", None),
    "agnews": (CLASSIFICATION, "Article: {text}\nCategory: {label}", "test", None),
    "trec": (CLASSIFICATION, "Question: {text}\nType: {label}", "test", None),
    "copa": (MULTIPLE_CHOICE, "{question} {choice}", "validation", "copa"),
    "openbookqa": (MULTIPLE_CHOICE, "{question} {choice}.", "validation", None),
    "qasc": (MULTIPLE_CHOICE, "{question} {choice}", "test", None),
    "hellaswag": (MULTIPLE_CHOICE, "{question} {choice}", "test", None),
    "winogrande": (MULTIPLE_CHOICE, "{question} {choice}", "test", "winogrande"),
}


def _prepare_copa(row: dict) -> dict:
    # "premise because|therefore choice", premise without its final period.
    premise = row["question"].strip()
    if premise.endswith("."):
        premise = premise[:-1]
    asks_for = row.get("asks_for")
    if asks_for not in ("cause", "effect"):
        raise TaskError(f"COPA row needs 'asks_for' = 'cause' or 'effect', found {asks_for!r}")
    word = "because" if asks_for == "cause" else "therefore"
    return {**row, "question": f"{premise} {word}"}


def _prepare_winogrande(row: dict) -> dict:
    # Context = text before "_"; each continuation = option + text after "_".
    sentence = row["question"]
    if sentence.count("_") != 1:
        raise TaskError(f"WinoGrande row needs exactly one '_' blank, found: {sentence!r}")
    before, after = (part.strip() for part in sentence.split("_"))
    return {**row, "question": before, "choices": [f"{c} {after}" for c in row["choices"]]}


# The paper's shot counts (Deep-Thinking v3, Table 7): demonstrations per class for
# classification (8/10/8/8/12 in total), demonstrations in all for multiple choice.
DEFAULT_SHOTS: dict[str, int] = {
    "sst2": 4, "sst5": 2, "mr": 4, "agnews": 2, "trec": 2,
    "copa": 4, "openbookqa": 4, "qasc": 4, "hellaswag": 4, "winogrande": 4,
}


ROW_TRANSFORMS: dict[str, Callable[[dict], dict]] = {
    "copa": _prepare_copa,
    "winogrande": _prepare_winogrande,
}

@dataclass
class Task:
    """One task: its template, label words and rows (see the module docstring)."""

    name: str
    kind: str
    label_words: list[str] | None
    separator: str
    template: str
    directory: Path
    eval_split: str
    row_transform: str | None = None
    builtin: bool = False  # one of BUILTIN_TASKS, recognised by name (no task.json)
    shots: int | None = None  # task.json "shots": the default demonstration count
    _rows: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_template(self.template, self.kind, f"task {self.name!r}")
        answer = "{" + _ANSWER_SLOT[self.kind] + "}"
        head, self._tail = self.template.split(answer)
        self._query_template = head.rstrip(" ")
        self._joiner = head[len(self._query_template):]

    # -- rows ---------------------------------------------------------------------------
    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return self.directory / f"{split}.jsonl"

    def has_split(self, split: str) -> bool:
        return split in self._rows or self.split_path(split).is_file()

    def set_rows(self, rows: dict[str, list[dict]]) -> None:
        """Rows that do not come from jsonl files (e.g. tasks/datasets.py), validated."""
        self._rows.update(rows)

    def rows(self, split: str) -> list[dict]:
        """All rows of a split, validated (cached)."""
        if split not in self._rows:
            self._rows[split] = self._load_rows(split)
        return self._rows[split]

    def _load_rows(self, split: str) -> list[dict]:
        path = self.split_path(split)
        if not path.is_file():
            found = sorted(p.name for p in self.directory.glob("*.jsonl"))
            raise TaskError(
                f"{path}: missing; task {self.name!r} needs {split}.jsonl (one JSON object "
                f"per line) in {self.directory}. Found: {found or 'no .jsonl files'}.")
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{where}: not valid JSON ({exc}); expected one JSON "
                                    f"object per line.") from None
                self.check_row(row, where)
                rows.append(row)
        if not rows:
            raise TaskError(f"{path}: no rows; expected one JSON object per line.")
        return rows

    def check_row(self, row: Any, where: str) -> None:
        """Raise TaskError (naming `where`) unless `row` is a valid row of this task."""
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object, found {type(row).__name__}")
        example = ('{"text": "...", "label": 0}' if self.kind == CLASSIFICATION
                   else '{"question": "...", "choices": ["...", "..."], "label": 0}')
        if self.kind == MULTIPLE_CHOICE:
            choices = row.get("choices")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c for c in choices)):
                raise TaskError(f"{where}: a multiple-choice row needs 'choices', a list of at "
                                f"least two non-empty strings; found {choices!r}. Expected "
                                f"rows like {example}.")
            num_labels = len(choices)
        else:
            num_labels = len(self.label_words)
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise TaskError(f"{where}: 'label' must be an integer in [0, {num_labels - 1}] "
                            f"({'choices' if self.kind == MULTIPLE_CHOICE else 'label words'}), "
                            f"found {label!r}. Expected rows like {example}.")
        try:
            prepared = self._prepared(row)
        except (TaskError, KeyError) as exc:
            raise TaskError(f"{where}: {exc}") from None
        for name in _PLACEHOLDER.findall(self._query_template):
            if not isinstance(prepared.get(name), (str, int, float)):
                raise TaskError(f"{where}: the template uses {{{name}}} but the row has no "
                                f"string field {name!r} (found keys {sorted(row)}). Expected "
                                f"rows like {example}.")

    def _prepared(self, row: dict) -> dict:
        if self.row_transform is None:
            return row
        return ROW_TRANSFORMS[self.row_transform](row)

    # -- formatting -----------------------------------------------------------------------
    def format_query(self, row: dict) -> str:
        """The prompt text up to the answer, without trailing spaces."""
        prepared = self._prepared(row)
        return _PLACEHOLDER.sub(lambda m: str(prepared[m.group(1)]).strip(), self._query_template)

    def choices(self, row: dict) -> list[str]:
        """The candidate continuations, each with its own leading space (if the template
        has one before the answer)."""
        if self.kind == CLASSIFICATION:
            answers = self.label_words
        else:
            answers = self._prepared(row)["choices"]
        return [f"{self._joiner}{answer}{self._tail}" for answer in answers]

    def label(self, row: dict) -> int:
        return int(row["label"])

    def format_demo(self, row: dict) -> str:
        """Query + correct continuation: one demonstration."""
        return self.format_query(row) + self.choices(row)[self.label(row)]

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "kind": self.kind, "template": self.template,
                "label_words": self.label_words, "separator": self.separator,
                "eval_split": self.eval_split, "directory": str(self.directory)}
        if self.row_transform is not None:
            data["row_transform"] = self.row_transform
        return data


def _check_template(template: Any, kind: str, source: str) -> None:
    input_slot, answer_slot = _INPUT_SLOT[kind], _ANSWER_SLOT[kind]
    example = ('"Review: {text}\\nSentiment: {label}"' if kind == CLASSIFICATION
               else '"{question} {choice}"')
    if not isinstance(template, str):
        raise TaskError(f"{source}: 'template' must be a string like {example}, "
                        f"found {template!r}")
    names = _PLACEHOLDER.findall(template)
    if input_slot not in names:
        raise TaskError(f"{source}: template {template!r} has no {{{input_slot}}} placeholder; "
                        f"a {kind} template looks like {example}.")
    if names.count(answer_slot) != 1:
        raise TaskError(f"{source}: template {template!r} must contain {{{answer_slot}}} exactly "
                        f"once (found {names.count(answer_slot)}); it marks where the answer "
                        f"goes, e.g. {example}.")
    head, tail = template.split("{" + answer_slot + "}")
    if input_slot not in _PLACEHOLDER.findall(head):
        raise TaskError(f"{source}: in template {template!r}, {{{input_slot}}} must come before "
                        f"{{{answer_slot}}}, e.g. {example}.")
    if _PLACEHOLDER.findall(tail):
        raise TaskError(f"{source}: template {template!r} has placeholders after "
                        f"{{{answer_slot}}}; only literal text may follow the answer.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: not valid JSON ({exc}).") from None


def _default_eval_split(directory: Path) -> str:
    for split in ("test", "validation"):
        if (directory / f"{split}.jsonl").is_file():
            return split
    return "test"


def _check_label_words(words: Any, source: str) -> list[str]:
    if (not isinstance(words, list) or len(words) < 2
            or not all(isinstance(w, str) and w.strip() for w in words)):
        raise TaskError(f"{source}: label words must be a list of at least two non-empty "
                        f"strings, one per label in label order, e.g. [\"negative\", "
                        f"\"positive\"]; found {words!r}")
    return words


def load_task(task_dir: str | Path) -> Task:
    """A built-in task (by directory name) or a directory with a task.json."""
    directory = Path(task_dir).expanduser()
    if not directory.is_dir():
        raise TaskError(f"{directory}: no such task directory; expected a directory with "
                        f"train.jsonl, test.jsonl (or validation.jsonl) and, unless it is one "
                        f"of the built-in tasks {sorted(BUILTIN_TASKS)}, a {TASK_FILE}.")
    task_file = directory / TASK_FILE
    if task_file.is_file():
        task = _task_from_json(directory, task_file)
    elif directory.name in BUILTIN_TASKS:
        task = _builtin_task(directory)
    else:
        raise TaskError(
            f"{directory}: {TASK_FILE} is missing and {directory.name!r} is not a built-in task "
            f"({sorted(BUILTIN_TASKS)}). Add a {TASK_FILE} such as "
            '{"kind": "classification", "template": "Review: {text}\\nSentiment: {label}", '
            '"label_words": ["negative", "positive"]}.')
    if not task.has_split("train"):
        raise TaskError(f"{directory}: train.jsonl is missing; demonstrations are sampled "
                        f"from it (one JSON object per line).")
    if not task.has_split(task.eval_split):
        raise TaskError(f"{directory}: {task.eval_split}.jsonl (the evaluation split) is "
                        f"missing; add it or set \"eval_split\" in {TASK_FILE}.")
    return task


def _builtin_task(directory: Path) -> Task:
    name = directory.name
    kind, template, eval_split, transform = BUILTIN_TASKS[name]
    label_words = None
    if kind == CLASSIFICATION:
        path = directory / "verbalizers.json"
        if not path.is_file():
            raise TaskError(f"{path}: missing; the built-in task {name!r} takes its label "
                            f"words from verbalizers.json (a JSON list, one word per label).")
        label_words = _check_label_words(_read_json(path), str(path))
    return Task(name=name, kind=kind, label_words=label_words, separator=DEFAULT_SEPARATOR,
                template=template, directory=directory, eval_split=eval_split,
                row_transform=transform, builtin=True)


def _task_from_json(directory: Path, path: Path) -> Task:
    spec = _read_json(path)
    source = str(path)
    if not isinstance(spec, dict):
        raise TaskError(f"{source}: expected a JSON object, found {type(spec).__name__}")
    if spec.get("dataset") is not None:
        raise TaskError(f"{source} names a dataset ({spec['dataset']!r}); load it with "
                        f"tasks.datasets.open_task (`task_dir` and `dataset`), "
                        f"not as a directory of jsonl files.")
    unknown = sorted(set(spec) - TASK_JSON_KEYS)
    if unknown:
        raise TaskError(f"{source}: unknown keys {unknown}; allowed keys are "
                        f"{sorted(TASK_JSON_KEYS)} (and, for a `dataset`, the column keys of "
                        f"tasks/datasets.py).")
    return task_from_spec(spec, directory, source)


def task_from_spec(spec: dict, directory: Path, source: str) -> Task:
    """A Task from the keys of a task.json (already checked for unknown keys)."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise TaskError(f"{source}: 'kind' must be one of {list(KINDS)}, found {kind!r}")
    if "template" not in spec:
        raise TaskError(f"{source}: 'template' is missing, e.g. "
                        + ('"Review: {text}\\nSentiment: {label}"' if kind == CLASSIFICATION
                           else '"{question} {choice}"'))
    _check_template(spec["template"], kind, source)
    label_words = None
    if kind == CLASSIFICATION:
        if "label_words" not in spec:
            raise TaskError(f"{source}: 'label_words' is missing; a classification task needs "
                            f"one word per label in label order, e.g. [\"negative\", "
                            f"\"positive\"].")
        label_words = _check_label_words(spec["label_words"], source)
    elif "label_words" in spec:
        raise TaskError(f"{source}: 'label_words' is for classification; multiple-choice rows "
                        f"hold their own 'choices'. Remove it or set \"kind\": "
                        f"\"classification\".")
    separator = spec.get("separator", DEFAULT_SEPARATOR)
    if not isinstance(separator, str):
        raise TaskError(f"{source}: 'separator' must be a string, found {separator!r}")
    eval_split = spec.get("eval_split", _default_eval_split(directory))
    if eval_split not in ("test", "validation"):
        raise TaskError(f"{source}: 'eval_split' must be 'test' or 'validation', "
                        f"found {eval_split!r}")
    name = spec.get("name", directory.name)
    if not isinstance(name, str) or not name:
        raise TaskError(f"{source}: 'name' must be a non-empty string, found {name!r}")
    shots = spec.get("shots")
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool)
                              or shots < 1):
        raise TaskError(f"{source}: 'shots' must be a positive integer (demonstrations per "
                        f"class, or in all for multiple choice), found {shots!r}")
    return Task(name=name, kind=kind, label_words=label_words, separator=separator,
                template=spec["template"], directory=directory, eval_split=eval_split,
                shots=shots)

def rows_by_label(task: Task, rows: list[dict], indices: list[int]) -> dict[int, list[int]]:
    """The indices of `rows` among `indices`, grouped by label."""
    by_label: dict[int, list[int]] = {}
    for i in indices:
        by_label.setdefault(task.label(rows[i]), []).append(i)
    return by_label


def default_shots(task: Task) -> int | None:
    """The task.json's "shots", else the paper's shot count of a built-in task (per class
    for classification, in all for multiple choice), else None."""
    if task.shots is not None:
        return task.shots
    return DEFAULT_SHOTS.get(task.name) if task.builtin else None


def template_fields(task: Task) -> list[str]:
    """The row fields the query template fills (e.g. ["text"])."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(task._query_template)))
