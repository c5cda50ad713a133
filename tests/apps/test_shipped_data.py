"""`make serve` works from a fresh clone: its adapters are built from the task data shipped
in examples/data (by the demo manifest examples/demo.jsonl), never from a folder outside
the repository."""

from __future__ import annotations

import re
import subprocess

from tests.helpers import REPO_ROOT
from vllm_deepthink.tasks import eval_rows, load_task


def test_make_serve_builds_from_the_shipped_data_only():
    """`make serve` builds the lines of the demo manifest (vllm-deepthink demo), each from
    a task of examples/data and selected on dev (the printed summary's ICL and
    Deep-Thinking dev columns come from that record), and serves exactly those adapters."""
    from vllm_deepthink.producers.deepthink.manifest import read_manifest

    dry_run = subprocess.run(["make", "-n", "-B", "adapters", "serve", "BIN=.venv/bin"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    demo = [line for line in dry_run.splitlines() if "vllm-deepthink demo" in line]
    assert len(demo) == 1 and "--manifest examples/demo.jsonl" in demo[0], dry_run
    assert "--out-dir adapters_store" in dry_run and "vllm-deepthink build" not in dry_run
    entries = read_manifest(REPO_ROOT / "examples" / "demo.jsonl", {"model": "m"})
    for entry in entries:
        assert entry.spec["task_dir"].startswith("examples/data/"), entry.spec
        assert (REPO_ROOT / entry.spec["task_dir"]).is_dir()
        assert entry.spec.get("select_on", "dev") == "dev"
    served = dict(re.findall(r"([\w.-]+)=adapters_store/([\w.-]+)", dry_run))
    assert sorted(served) == ["sst2", "trec"]
    assert sorted(served.values()) == sorted(e.name for e in entries)
    assert "../" not in dry_run, dry_run


def test_shipped_tasks_are_the_builtin_sst2_and_trec():
    for name, classes in (("sst2", 2), ("trec", 6)):
        task = load_task(REPO_ROOT / "examples" / "data" / name)
        assert task.name == name and len(task.label_words) == classes
        labels = {row["label"] for row in task.rows("train")}
        assert labels == set(range(classes))          # every class has demonstrations
        assert len(task.rows("train")) >= 600 and len(eval_rows(task)) == 100
