"""`vllm-deepthink build --manifest`: the command over build_manifest, with worker
processes, the flags given as every line's defaults, and its usage errors."""

from __future__ import annotations

import json

import pytest

from tests.helpers.manifests import MISSING, SST2, TREC, write_manifest
from vllm_deepthink import DeepThinkAdapter
from vllm_deepthink.apps import cli

FAST = ["--select-on", "none", "--iterations", "2", "--shots-per-class", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_path(tiny_llama_dir):
    return str(tiny_llama_dir)


@pytest.mark.subprocess
def test_manifest_with_two_worker_processes(model_path, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "tasks.jsonl", [SST2, MISSING, TREC])
    store, report = tmp_path / "store", tmp_path / "summary.json"
    code = cli.main(["build", "--manifest", str(manifest), "--out-dir", str(store),
                     "--model", model_path, *FAST, "--workers", "2", "--output-json", str(report)])
    assert code == 1  # a task failed; the others were built
    table = capsys.readouterr().out
    assert "failed: missing (line 2): `task_dir`" in table and "2 worker(s)" in table
    summary = json.loads(report.read_text())
    assert summary["counts"] == {"built": 2, "skipped": 0, "failed": 1}
    assert summary["workers"] == 2 and summary["threads"] >= 1
    assert json.loads((store / "_manifest_summary.json").read_text())["counts"] == \
        summary["counts"]
    config = DeepThinkAdapter.from_pretrained(store / "trec-s1").config
    # the flags given apply to every line: two iterations, the last kept
    assert (config.iterations_run, config.task["seed"]) == (2, 1)
    assert config.build_args["select_on"] == "none"

    # Again, without the failing line: nothing to build, nothing fails.
    write_manifest(manifest, [SST2, TREC])
    assert cli.main(["build", "--manifest", str(manifest), "--out-dir", str(store),
                     "--model", model_path, *FAST, "--workers", "2", "--output-json",
                     str(report)]) == 0
    assert json.loads(report.read_text())["counts"] == {"built": 0, "skipped": 2, "failed": 0}
    # A flag is a default of every line, so it changes their digests, except where a
    # line sets the field itself (both set "seed").
    for flags, built in ((["--seed", "3"], 0), (["--batch-size", "8"], 2)):
        assert cli.main(["build", "--manifest", str(manifest), "--out-dir", str(store),
                         "--model", model_path, *FAST, *flags, "--output-json", str(report)]) == 0
        assert json.loads(report.read_text())["counts"]["built"] == built


@pytest.mark.parametrize("extra, message", [
    (["--task-dir", "x"], "--task-dir: one build's flags; with --manifest"),
    (["--out", "x"], "--out: one build's flags"),
    (["--out-dir", "{out}", "--workers", "0"], "--workers must be >= 1"),
    ([], "--manifest needs --out-dir"),
    (["--out-dir", "{out}", "--seed", "4"], "line 2: \"seed\" must be an integer, found "
                                            "'one'"),
])
def test_manifest_usage_errors(tmp_path, extra, message):
    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text('{"name": "a", "task_dir": "x"}\n{"name": "b", "seed": "one"}\n'
                        if "line 2" in message else '{"name": "a", "task_dir": "x"}\n')
    extra = [e.replace("{out}", str(tmp_path / "out")) for e in extra]
    with pytest.raises(SystemExit) as info:
        cli.main(["build", "--manifest", str(manifest), "--model", "m", *extra])
    assert "vllm-deepthink build: error:" in str(info.value) and message in str(info.value)


def test_one_build_refuses_manifest_flags_and_needs_a_model(tmp_path):
    with pytest.raises(SystemExit, match="--workers applies to --manifest only"):
        cli.main(["build", "--model", "m", "--task-dir", "x", "--workers", "2"])
    with pytest.raises(SystemExit, match="--model is required"):
        cli.main(["build", "--task-dir", "x"])
