"""`make serve` works from a fresh clone: its adapters are built from the task data shipped
in examples/data, never from a folder outside the repository."""

from __future__ import annotations

import subprocess

from tests.helpers import REPO_ROOT
from vllm_deepthink.tasks import eval_rows, load_task


def test_make_serve_builds_from_the_shipped_data_only():
    dry_run = subprocess.run(["make", "-n", "-B", "adapters", "serve", "BIN=.venv/bin"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    builds = [line for line in dry_run.splitlines() if "vllm-deepthink build" in line]
    assert len(builds) == 2, dry_run
    assert all("--task-dir examples/data/" in line for line in builds), builds
    assert "../" not in dry_run, dry_run


def test_shipped_tasks_are_the_builtin_sst2_and_trec():
    for name, classes in (("sst2", 2), ("trec", 6)):
        task = load_task(REPO_ROOT / "examples" / "data" / name)
        assert task.name == name and len(task.label_words) == classes
        labels = {row["label"] for row in task.rows("train")}
        assert labels == set(range(classes))          # every class has demonstrations
        assert len(task.rows("train")) >= 600 and len(eval_rows(task)) == 100
