"""Task rows through the `datasets` library, on local parquet / csv / jsonl files."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from vllm_deepthink.tasks import TaskError, eval_rows, sample_demos  # noqa: E402
from vllm_deepthink.tasks.datasets import DatasetSpec, load_dataset_task  # noqa: E402

REVIEWS = ["a charming film", "labored gags", "quick and lovely", "a lazy dog of a movie",
           "sharp and warm", "no wit at all", "a joy", "tedious"]


def write_task(path, **keys):
    path.write_text(json.dumps({"kind": "classification",
                                "template": "Review: {text}\nSentiment: {label}", **keys}))
    return path


def test_parquet_splits_with_classlabel_names_become_label_words(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = tmp_path / "reviews"
    data.mkdir()
    for split, rows in (("train", REVIEWS), ("test", REVIEWS[:4])):
        datasets.Dataset.from_dict({"sentence": rows, "label": [(n + 1) % 2 for n in
                                                                range(len(rows))]},
                                   features=features).to_parquet(str(data / f"{split}.parquet"))
    config = write_task(tmp_path / "task.json", text_column="sentence", name="reviews")
    task = load_dataset_task(str(data), config)
    assert task.label_words == ["negative", "positive"] and task.eval_split == "test"
    assert task.format_query(task.rows("train")[0]) == "Review: a charming film\nSentiment:"
    assert [r["label"] for r in eval_rows(task)] == [1, 0, 1, 0]
    demos = sample_demos(task, 1, seed=0)
    assert sorted(task.rows("train")[i]["label"] for i in demos.indices) == [0, 1]


def test_csv_with_string_labels_and_a_split_mapping(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("review,sentiment\n" + "".join(
        f"{text},{'good' if n % 2 == 0 else 'bad'}\n" for n, text in enumerate(REVIEWS)))
    config = write_task(tmp_path / "task.json", text_column="review", label_column="sentiment",
                        label_words=["bad", "good"], splits={"test": "train"})
    task = load_dataset_task(str(train), config)
    assert [r["label"] for r in task.rows("train")][:2] == [1, 0]
    # Without the mapping there is no evaluation split: the error says how to add one.
    write_task(tmp_path / "task.json", text_column="review", label_column="sentiment",
               label_words=["bad", "good"])
    with pytest.raises(TaskError, match="no 'validation' split.*Map one with \"splits\""):
        load_dataset_task(str(train), tmp_path / "task.json")


def test_jsonl_multiple_choice_columns(tmp_path):
    data = tmp_path / "mc"
    data.mkdir()
    rows = [{"q": f"premise {n}", "options": ["yes", "no"], "answer": n % 2} for n in range(6)]
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "task.json").write_text(json.dumps({
        "kind": "multiple_choice", "template": "{question} {choice}", "question_column": "q",
        "choices_column": "options", "label_column": "answer"}))
    task = load_dataset_task(str(data), data)
    assert task.eval_split == "validation"
    assert task.choices(task.rows("train")[0]) == [" yes", " no"]


def test_wrong_columns_and_keys_say_what_is_there(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("review,label\nfine,0\nbad,1\n")
    with pytest.raises(TaskError, match=r"columns \['text'\] not found; the dataset has "
                                        r"\['review', 'label'\]"):
        load_dataset_task(str(train), write_task(tmp_path / "t.json", label_words=["a", "b"]))
    with pytest.raises(TaskError, match="unknown keys \\['text_col'\\]"):
        load_dataset_task(str(train), write_task(tmp_path / "t.json", text_col="review"))


def test_hub_specs_parse_to_load_dataset_arguments():
    assert DatasetSpec.parse("glue:sst2") == DatasetSpec("glue", "sst2")
    assert DatasetSpec.parse("SetFit/sst5") == DatasetSpec("SetFit/sst5", None)
    with pytest.raises(TaskError, match="expected NAME\\[:CONFIG\\]"):
        DatasetSpec.parse(":x")


def test_a_dataset_split_mapped_to_test_is_not_also_validation(tmp_path):
    """{"test": "validation"} (examples/tasks/sst2): the dataset's validation rows are the
    test split only, so `build --dev-split validation` cannot select on them."""
    from vllm_deepthink.tasks import dev_split

    data = tmp_path / "reviews"
    data.mkdir()
    for split, rows in (("train", REVIEWS), ("validation", REVIEWS[:4])):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence": t, "label": n % 2}) + "\n" for n, t in enumerate(rows)))
    config = write_task(tmp_path / "task.json", text_column="sentence",
                        label_words=["negative", "positive"], splits={"test": "validation"},
                        eval_split="test")
    task = load_dataset_task(str(data), config)
    assert len(task.rows("test")) == 4 and not task.has_split("validation")
    with pytest.raises(TaskError, match="has no 'validation' split.*from 'train'"):
        dev_split(task, 2, seed=0, exclude=set(), split="validation")


def test_every_datasets_requirement_excludes_loading_scripts():
    """Issue 32 item 7: datasets < 4 runs a hub repository's loading script (code) when
    asked; every extra that installs datasets pins >= 4."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    found = [Requirement(r) for extra in project["project"]["optional-dependencies"].values()
             for r in extra if Requirement(r).name == "datasets"]
    assert found, "no extra installs datasets"
    for requirement in found:
        assert not requirement.specifier.contains("3.6.0"), str(requirement)
        assert requirement.specifier.contains("4.0.0"), str(requirement)
