"""`vllm-deepthink demo` (apps/demo): the demo manifest's settings reach the builder, the
printed summary has a row per adapter with T and the accuracy of every mode, unchanged
adapters are neither built nor scored again (the shipped demo manifest and `make serve`:
test_shipped_data.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.manifests import DATA, write_manifest
from tests.helpers.tiny_models import make_tiny_model
from vllm_deepthink import DeepThinkAdapter
from vllm_deepthink.apps import cli
from vllm_deepthink.apps.demo.run import SUMMARY_NAME, build_demo
from vllm_deepthink.apps.eval.modes import MODES

POLICY = {"max_iterations": 3, "min_iterations": 3, "guard_k": 0}
TEST_ROWS = 8


def small_tasks(root):
    """SST-2 and TREC as shipped, but TEST_ROWS test rows (the tiny model scores fast)."""
    for name in ("sst2", "trec"):
        shutil.copytree(DATA / name, root / name)
        test = root / name / "test.jsonl"
        test.write_text("".join(test.read_text().splitlines(True)[:TEST_ROWS]))
    return [{"name": "sst2-s0", "task_dir": str(root / "sst2"), "seed": 0,
             "shots_per_class": 1, "dev_size": 12, "policy": POLICY},
            {"name": "trec-s1", "task_dir": str(root / "trec"), "seed": 1,
             "shots_per_class": 1, "dev_size": 9, "optimizer": "ema", "eta": 0.2,
             "position_mode": "aligned", "policy": POLICY}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    manifest = write_manifest(root / "demo.jsonl", small_tasks(root))
    return manifest, root / "store", build_demo(tiny, root / "store", manifest,
                                                progress=False)


def test_the_manifest_settings_reach_the_builder(demo):
    _, store, summary = demo
    assert summary.built == ["sst2-s0", "trec-s1"]
    sst2 = DeepThinkAdapter.from_pretrained(store / "sst2-s0").config
    trec = DeepThinkAdapter.from_pretrained(store / "trec-s1").config
    assert (sst2.task["dev_size"], sst2.task["seed"], sst2.iterations_run) == (12, 0, 3)
    assert sst2.selection["policy"]["max_iterations"] == 3
    assert (trec.optimizer, trec.optimizer_params, trec.position_mode) == \
        ("ema", {"eta": 0.2}, "aligned")
    assert (trec.task["dev_size"], trec.task["shots_per_class"]) == (9, 1)


def test_the_summary_has_every_adapter_and_mode(demo):
    _, store, summary = demo
    by_name = {r.name: r for r in summary.rows}
    assert list(by_name) == ["sst2-s0", "trec-s1"]
    for name, row in by_name.items():
        config = DeepThinkAdapter.from_pretrained(store / name).config
        assert (row.selected_iteration, row.iterations_run, row.prefix_len) == \
            (config.selected_iteration, config.iterations_run, config.prefix_len)
        assert row.dev_size == config.task["dev_size"]
        assert row.dev["icl"] == config.selection["t1_dev_acc"]
        assert set(row.dev) == set(row.test) == set(MODES)
        assert all(0.0 <= v <= 1.0 for v in [*row.dev.values(), *row.test.values()])
        assert (row.test_split, row.test_size) == ("test", TEST_ROWS)
    # T=1 keeps ICL's K/V: Deep-Thinking then scores exactly as ICL, on dev and test.
    for row in by_name.values():
        if row.selected_iteration == 1:
            assert row.dev["deepthink"] == row.dev["icl"]
            assert row.test["deepthink"] == row.test["icl"]
    lines = summary.table().splitlines()
    assert lines[0].split()[:2] == ["adapter", "T"] and "0-shot" in lines[0]
    row = next(line for line in lines if line.startswith("trec-s1"))
    t = by_name["trec-s1"]
    assert f"{t.selected_iteration}/{t.iterations_run}" in row.split()
    assert f"{100 * t.dev['zero-shot']:.1f}" in row and f"{100 * t.test['icl']:.1f}" in row
    assert "ema(eta=0.2)/aligned" in row


def test_an_unchanged_demo_is_neither_built_nor_scored_again(demo, tiny, capsys,
                                                            monkeypatch):
    from vllm_deepthink.apps.demo import run

    def scored(*args, **kwargs):
        raise AssertionError("an unchanged adapter was scored again")

    monkeypatch.setattr(run, "score_adapter", scored)
    manifest, store, first = demo
    saved = json.loads((store / SUMMARY_NAME).read_text())
    assert [r["name"] for r in saved["rows"]] == ["sst2-s0", "trec-s1"]
    assert cli.main(["demo", "--model", tiny, "--manifest", str(manifest), "--out-dir",
                     str(store), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Built now: none" in out
    assert [line.split()[:8] for line in out.splitlines()[1:3]] == \
        [line.split()[:8] for line in first.table().splitlines()[1:3]]


def test_a_failed_line_is_a_usage_error(tiny, tmp_path):
    manifest = write_manifest(tmp_path / "demo.jsonl",
                              [{"name": "gone", "task_dir": str(tmp_path / "nope")}])
    with pytest.raises(SystemExit, match="demo: error: demo adapters failed to build: gone "
                                         "\\(line 1\\)"):
        cli.main(["demo", "--model", tiny, "--manifest", str(manifest), "--out-dir",
                  str(tmp_path / "store"), "--no-progress"])


def test_the_builds_report_their_iterations(tiny, tmp_path, capfd):
    """A first `make serve` shows each build's plan, iterations and choice as it goes."""
    line = {**small_tasks(tmp_path)[0], "policy": {**POLICY, "max_iterations": 2,
                                                   "min_iterations": 2}}
    manifest = write_manifest(tmp_path / "demo.jsonl", [line])
    build_demo(tiny, tmp_path / "store", manifest, test=False)
    err = capfd.readouterr().err
    assert "up to 2 iterations" in err and "iteration   2  dev acc" in err, err
    assert "-> kept iteration" in err


def test_a_line_not_selected_on_dev_is_refused(tiny, tmp_path):
    """The summary's dev columns come from the build's selection record."""
    line = {**small_tasks(tmp_path)[0], "select_on": "none", "policy": {"max_iterations": 1}}
    manifest = write_manifest(tmp_path / "demo.jsonl", [line])
    with pytest.raises(SystemExit, match="was not selected on dev; a demo manifest line "
                                         "keeps \"select_on\" dev"):
        cli.main(["demo", "--model", tiny, "--manifest", str(manifest), "--out-dir",
                  str(tmp_path / "store"), "--no-progress"])
