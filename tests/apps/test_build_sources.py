"""`vllm-deepthink build` from a `datasets` dataset, and from a model named by hub id
(a real hub-cache layout, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.datasets_files import write_reviews_dataset
from tests.helpers.hub_cache import offline_env, publish
from vllm_deepthink import DeepThinkAdapter
from vllm_deepthink.apps import cli

BUILD = ["--shots-per-class", "1", "--iterations", "2", "--dev-size", "6", "--guard-k", "0"]


def test_build_from_a_local_csv_dataset(tiny_llama_dir, tmp_path):
    pytest.importorskip("datasets")
    write_reviews_dataset(tmp_path)
    out = tmp_path / "adapter"
    assert cli.main(["build", "--model", str(tiny_llama_dir), "--dataset", str(tmp_path), *BUILD,
                     "--out", str(out)]) == 0
    config = DeepThinkAdapter.from_pretrained(out).config
    assert config.task["name"] == "reviews" and config.task["dev_size"] == 6
    assert "Review: review number" in config.demos_text


@pytest.mark.subprocess
def test_build_from_a_model_named_by_hub_id_offline(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    publish(tiny_llama_dir, cache, "org/tiny-llama")
    out = tmp_path / "adapter"
    env = {**os.environ, **offline_env(cache), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "vllm_deepthink.apps.cli", "build", "--model", "org/tiny-llama",
         "--task-dir", str(REPO_ROOT / "examples" / "data" / "sst2"), *BUILD, "--out",
         str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = DeepThinkAdapter.from_pretrained(out).config
    assert config.base_model_name_or_path == "org/tiny-llama"
    from vllm_deepthink.format import ModelFingerprint
    assert config.fingerprint == ModelFingerprint.from_checkpoint(tiny_llama_dir)
    # A hub id that is not in the cache is refused before any work, saying how to fix it.
    missing = subprocess.run(
        [sys.executable, "-m", "vllm_deepthink.apps.cli", "build", "--model", "org/missing",
         "--task-dir", str(REPO_ROOT / "examples" / "data" / "sst2"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "HF_HUB_OFFLINE=1" in missing.stderr


def test_eval_on_a_local_jsonl_dataset_with_its_task_json(tiny_llama_dir, tmp_path):
    """`eval --dataset DIR` reads the rows through the datasets library, the columns
    mapped by DIR's task.json, and scores exactly what `--task-dir` scores on the same
    rows written as the built-in jsonl layout."""
    pytest.importorskip("datasets")
    rows = [{"sentence": f"line {n} was {'fine' if n % 2 else 'poor'}", "y": n % 2}
            for n in range(12)]
    data = tmp_path / "data"
    data.mkdir()
    for split, part in (("train", rows[:8]), ("test", rows[8:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    spec = {"kind": "classification", "name": "lines", "template": "Line: {text}\nVerdict: "
            "{label}", "label_words": ["poor", "fine"]}
    (data / "task.json").write_text(json.dumps({**spec, "text_column": "sentence",
                                                "label_column": "y"}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "task.json").write_text(json.dumps(spec))
    for split, part in (("train", rows[:8]), ("test", rows[8:])):
        (plain / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": r["sentence"], "label": r["y"]}) + "\n" for r in part))
    results = {}
    for name, source in (("dataset", ["--dataset", str(data)]),
                         ("task-dir", ["--task-dir", str(plain)])):
        out = tmp_path / f"{name}.json"
        assert cli.main(["eval", "--model", str(tiny_llama_dir), *source, "--engine", "hf",
                         "--no-progress", "--output-json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    by_dataset, by_dir = results["dataset"], results["task-dir"]
    assert by_dataset["settings"]["dataset"] == str(data)
    assert by_dataset["settings"]["task_dir"] is None
    assert by_dataset["labels"] == [r["y"] for r in rows[8:]]
    assert by_dataset["scores"] == by_dir["scores"]
    # Without a task.json anywhere the error says what is needed.
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(SystemExit, match="task.json"):
        cli.main(["eval", "--model", str(tiny_llama_dir), "--dataset", str(bare),
                  "--engine", "hf"])


# The split names of the hub datasets named in examples/tasks (their dataset cards);
# SST-2's test split has no labels (-1).
HUB_SPLITS = {"sst2": ("train", "validation", "test"), "sst5": ("train", "validation", "test"),
              "mr": ("train", "validation", "test"), "agnews": ("train", "test"),
              "trec": ("train", "test")}


@pytest.mark.parametrize("name", sorted(HUB_SPLITS))
def test_shipped_hub_task_files_load_against_their_columns(name, tmp_path):
    """examples/tasks/NAME/task.json (a hub dataset) drives `--task-dir` alone: the same
    file, its "dataset" pointed at local files with the hub dataset's columns and split
    names, loads with the paper's template, label words, shot count and split."""
    pytest.importorskip("datasets")
    from vllm_deepthink.tasks import default_shots
    from vllm_deepthink.tasks.datasets import open_task
    from vllm_deepthink.tasks.task import BUILTIN_TASKS, DEFAULT_SHOTS

    spec = json.loads((REPO_ROOT / "examples" / "tasks" / name / "task.json").read_text())
    assert "/" in spec["dataset"]  # a hub id
    text, label = spec.get("text_column", "text"), spec.get("label_column", "label")
    data = tmp_path / "data"
    data.mkdir()
    n_labels = len(spec["label_words"])
    for split in HUB_SPLITS[name]:
        unlabeled = name == "sst2" and split == "test"
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({text: f"{split} row {i}", label: -1 if unlabeled else i % n_labels})
            + "\n" for i in range(3 * n_labels)))
    task_dir = tmp_path / name
    task_dir.mkdir()
    (task_dir / "task.json").write_text(json.dumps({**spec, "dataset": "../data"}))
    task = open_task(task_dir)
    kind, template, eval_split, _ = BUILTIN_TASKS[name]
    assert (task.name, task.kind, task.template, task.eval_split) == (name, kind, template,
                                                                      eval_split)
    assert default_shots(task) == DEFAULT_SHOTS[name]
    theirs = {"train": "train", "validation": "validation", "test": "test",
              **spec.get("splits", {})}[eval_split]
    assert task.rows(eval_split)[0]["text"] == f"{theirs} row 0"
    assert task.format_demo(task.rows("train")[1]).endswith(spec["label_words"][1])
