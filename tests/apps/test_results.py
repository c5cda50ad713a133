"""`vllm-deepthink results` on a tiny model: a row is computed once, an interrupted row
resumes at its next search candidate with the same numbers, the report is generated."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_deepthink.apps import cli
from vllm_deepthink.apps.results import checkpoints as row_files
from vllm_deepthink.apps.results import runs, specs, table
from vllm_deepthink.format import DeepThinkAdapter

TEXTS = ["a charming film", "contains no wit , only labored gags", "the quick brown fox",
         "lazy dog", "the sun was rising", "the grass was cut", "a film", "only labored gags"]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("results")
    model_dir = tiny_llama_dir
    task = base / "data" / "sst2"  # a built-in task name: the paper's template and shots
    task.mkdir(parents=True)
    rows = [{"text": TEXTS[i % len(TEXTS)] + f" {i}", "label": (i * 7 // 3) % 2}
            for i in range(70)]
    (task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    (task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[60:]))
    (task / "verbalizers.json").write_text(json.dumps(["negative", "positive"]))
    return base, model_dir


def argv(setup, out, *extra):
    base, model_dir = setup
    return ["results", "--data-dir", str(base / "data"), "--out", str(out),
            "--model-path", f"smollm2={model_dir}", "--adapters-dir", str(out / "adapters"),
            "--rows", "smollm2-sst2-s0", "--dev-size", "12", "--limit", "10",
            "--iterations", "3", "--min-iterations", "2", "--patience", "1",
            "--threads", "1", "--no-progress", *extra]


def strip_seconds(value):
    if isinstance(value, dict):
        return {k: strip_seconds(v) for k, v in value.items()
                if "seconds" not in k}
    if isinstance(value, list):
        return [strip_seconds(v) for v in value]
    return value


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup[0] / "out-a"
    assert cli.main(argv(setup, out)) == 0
    return out, json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())


def test_row_json_holds_every_column(uninterrupted):
    out, row = uninterrupted
    assert row["schema"] == specs.ROW_SCHEMA and row["settings"]["n_test"] == 10
    assert {"zero-shot", "icl", "icl+cf", "icl+dev", "dt", "dt+cf", "dt+dev", "dt-search",
            "dt-oracle"} <= set(row["columns"])
    assert len(row["scores"]["icl"]) == 10 and len(row["scores"]["icl"][0]) == 2
    assert row["demos"]["shots_per_class"] == 4 and len(row["demos"]["indices"]) == 8
    assert len(row["selection"]["dt-search"]["candidates"]) == 14
    assert [e["iteration"] for e in row["test_trace"]] == list(
        range(1, row["selection"]["dt"]["candidates"][0]["iterations_run"] + 1))
    # T=1 Deep-Thinking is ICL, and the oracle is at least as good as every iteration
    assert row["test_trace"][0]["test_acc"] == row["columns"]["icl"]["acc"]
    assert row["columns"]["dt-oracle"]["acc"] == max(e["test_acc"] for e in row["test_trace"])
    assert "dt vs icl" in row["paired"] and (out / "results.md").is_file()
    assert (out / "curves.png").stat().st_size > 0
    assert "smollm2 | sst2 | 0 | 10 |" in (out / "results.md").read_text()
    for name in ("dt", "dt-search"):
        assert (out / "adapters" / f"smollm2-sst2-s0-{name}" / "deepthink_config.json").is_file()
    assert not (out / "work" / "smollm2-sst2-s0").exists()


def test_calibrated_columns_can_be_recomputed_from_the_json(uninterrupted):
    from vllm_deepthink.tasks import calibration

    _, row = uninterrupted
    for base in ("icl", "dt"):
        scores = [[(s, n) for s, n in zip(r, lengths)]
                  for r, lengths in zip(row["scores"][base], row["choice_tokens"])]
        preds = calibration.calibrated_predictions(scores, row["priors"][base]["dev-prior"])
        assert preds == row["columns"][f"{base}+dev"]["predictions"]


def test_interrupted_row_resumes_and_a_done_row_is_never_recomputed(setup, uninterrupted,
                                                                  monkeypatch):
    from vllm_deepthink.producers.deepthink import candidates

    out = setup[0] / "out-b"
    clock = iter(range(0, 10_000, 40))  # each reading of the clock is 40 s later
    monkeypatch.setattr(table, "_now", lambda: next(clock))
    # budget 220 s: start 0, row check 40, candidate 0 at 80, its 3 iterations at 120,
    # 160 and 200, candidate 1 at 240 -> stop
    assert cli.main(argv(setup, out, "--time-budget", "220s")) == 0
    work = out / "work" / "smollm2-sst2-s0"
    assert not (out / "json" / "smollm2-sst2-s0.json").exists()
    assert sorted(p.name for p in work.iterdir()) == [
        "cand-00.json", "cand-00.safetensors", "icl.json", "icl.safetensors", "zero-shot.json"]
    monkeypatch.undo()

    calls = []
    real = candidates.run_candidates
    monkeypatch.setattr(candidates, "run_candidates",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert cli.main(argv(setup, out)) == 0
    assert len(calls) == 13  # candidates 1..13 only
    row = json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())
    _, expected = uninterrupted
    for key in ("columns", "scores", "priors", "paired", "selection", "test_trace_scores"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key

    path = out / "json" / "smollm2-sst2-s0.json"
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(table, "compute_row", lambda *a, **k: pytest.fail("recomputed"))
    assert cli.main(argv(setup, out)) == 0
    assert path.stat().st_mtime_ns == before


def test_list_and_row_patterns(setup, uninterrupted, capsys):
    out, _ = uninterrupted
    assert cli.main(argv(setup, out, "--list")) == 0
    assert "smollm2-sst2-s0" in capsys.readouterr().out
    keys = [r.key for r in specs.default_rows()]
    assert keys[:5] == ["smollm2-sst2-s0", "smollm2-mr-s0", "smollm2-trec-s0",
                        "smollm2-sst5-s0", "smollm2-agnews-s0"]
    assert len(keys) == 15 + 12 + 5
    assert [r.key for r in specs.select_rows("gemma3-270m-*-s2")] == [
        "gemma3-270m-sst2-s2", "gemma3-270m-mr-s2", "gemma3-270m-trec-s2", "gemma3-270m-sst5-s2"]
    with pytest.raises(ValueError, match="neither a pattern"):
        specs.select_rows("nomodel-sst2-s0")
    assert table.parse_duration("1h30m") == 5400
    with pytest.raises(ValueError, match="duration"):
        table.parse_duration("soon")


def test_skip_search_first_pass_then_the_search_column(setup, uninterrupted, monkeypatch):
    from vllm_deepthink.producers.deepthink import candidates

    out = setup[0] / "out-c"
    assert cli.main(argv(setup, out, "--skip-search")) == 0
    path = out / "json" / "smollm2-sst2-s0.json"
    first = json.loads(path.read_text())
    assert first["search"] == "skipped" and "dt-search" not in first["columns"]
    assert "DT search" in (out / "results.md").read_text()  # the column, not yet filled
    spec = specs.select_rows("smollm2-sst2-s0")[0]
    assert row_files.row_state(out, spec) == "partial (no search)"
    assert row_files.row_state(out, spec, with_search=False) == "done without search"
    # A second first pass computes nothing; the full run adds candidates 1..13 only.
    monkeypatch.setattr(table, "compute_row", lambda *a, **k: pytest.fail("recomputed"))
    assert cli.main(argv(setup, out, "--skip-search")) == 0
    monkeypatch.undo()
    calls = []
    real = candidates.run_candidates
    monkeypatch.setattr(candidates, "run_candidates",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert cli.main(argv(setup, out)) == 0
    assert len(calls) == 13
    row = json.loads(path.read_text())
    _, expected = uninterrupted
    for key in ("columns", "scores", "priors", "paired", "selection"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key
    for column in ("icl", "dt", "icl+dev", "dt-oracle"):
        assert row["columns"][column] == first["columns"][column]


def test_label_balance_table_counts_each_columns_answers(uninterrupted):
    from vllm_deepthink.apps.results import report as results_report

    out, row = uninterrupted
    assert results_report.majority_share([1, 1, 0, 2]) == (0.5, 1)
    assert results_report.majority_share([0, 1]) == (0.5, 0)  # ties: the lower label
    text = (out / "results.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("| smollm2 | sst2 | 0 | ")
                and "## " not in l and l.count("|") == 10)
    gold_share, gold = results_report.majority_share(row["labels"])
    words = ["negative", "positive"]
    icl_share, icl = results_report.majority_share(row["columns"]["icl"]["predictions"])
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == f"{100 * gold_share:.0f} {words[gold]}"
    assert cells[5] == f"{100 * icl_share:.0f} {words[icl]}"


def test_json_checkpoints_without_their_kv_files_resume_the_same_row(setup, uninterrupted,
                                                                     monkeypatch):
    """The JSON checkpoints carried to another machine (committed; the .safetensors
    files are not): ICL's and candidate 0's K/V are recomputed by running the optimizer,
    nothing already scored is scored again, and the row equals the uninterrupted one."""
    from vllm_deepthink.producers.deepthink import candidates

    out = setup[0] / "out-json-only"
    clock = iter(range(0, 10_000, 40))
    monkeypatch.setattr(table, "_now", lambda: next(clock))
    assert cli.main(argv(setup, out, "--time-budget", "220s")) == 0  # as above: candidate 0
    monkeypatch.undo()
    work = out / "work" / "smollm2-sst2-s0"
    for path in work.glob("*.safetensors"):
        path.unlink()
    calls, replays, kv_saved = [], [], []
    real, real_replay, real_save = (candidates.run_candidates, runs.replay_kv,
                                    row_files._save_kv)
    monkeypatch.setattr(candidates, "run_candidates",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(runs, "replay_kv",
                        lambda *a: replays.append(list(a[3])) or real_replay(*a))
    monkeypatch.setattr(row_files, "_save_kv",
                        lambda path, *a: kv_saved.append(path.name) or real_save(path, *a))
    assert cli.main(argv(setup, out)) == 0
    expected_out, expected = uninterrupted
    best = expected["selection"]["dt"]["candidates"][0]["best_iteration"]
    assert replays == [[1], [best]] and len(calls) == 13
    # the replayed K/V are saved again (a later invocation does not replay them)
    assert kv_saved[:2] == ["icl.safetensors", "cand-00.safetensors"]
    row = json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())
    for key in ("columns", "scores", "priors", "paired", "selection", "test_trace_scores"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key
    for name in ("dt", "dt-search"):  # the served adapters hold the same K/V
        ours = DeepThinkAdapter.from_pretrained(out / "adapters" / f"smollm2-sst2-s0-{name}")
        theirs = DeepThinkAdapter.from_pretrained(
            expected_out / "adapters" / f"smollm2-sst2-s0-{name}")
        for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values):
            assert torch.equal(a, b)


def test_a_checkpoint_of_another_candidate_is_not_taken(tmp_path):
    """cand-NN.json of another grid (a changed candidate list) is not this candidate's."""
    from vllm_deepthink.producers.deepthink.search import search_grid

    grid = search_grid()
    checkpoints = row_files.RowCheckpoints(tmp_path)
    (tmp_path / "cand-00.json").write_text(json.dumps({"candidate": grid[1].to_dict()}))
    assert checkpoints.load_candidate(0, grid[0]) is None


def test_a_partial_checkpoint_with_a_short_test_trace_is_refused(tmp_path):
    """A cand-00.partial.json whose test trace does not match its dev results (e.g. edited
    or merged by hand) is refused with what was found and how to fix it, instead of
    misaligning the test trace."""
    from vllm_deepthink.producers.deepthink.search import search_grid

    candidate = search_grid()[0]
    checkpoints = row_files.RowCheckpoints(tmp_path)
    checkpoints.save_partial(0, candidate, {"dev": [{}, {}], "test_trace": [{}],
                                            "test_trace_scores": [[]], "seconds": 1.0})
    with pytest.raises(ValueError, match="2 dev results, 1 test trace entries.*delete"):
        runs.run_candidate(None, None, None, candidate, None, None,
                           record_test=True, checkpoints=checkpoints, index=0)


def test_search_column_of_a_committed_first_pass_row_skips_its_published_run(
        setup, uninterrupted, monkeypatch):
    """A --skip-search row whose checkpoints are gone (a later session with the row JSON
    only): the full run rebuilds zero-shot, ICL and the published-default candidate from
    the JSON (the optimizer run to the best iteration, no test trace again) and computes
    only candidates 1..13; the row equals the uninterrupted one."""
    import shutil

    from vllm_deepthink.producers.deepthink import candidates

    out = setup[0] / "out-d"
    assert cli.main(argv(setup, out, "--skip-search")) == 0
    shutil.rmtree(out / "work")
    calls = []
    real = candidates.run_candidates
    monkeypatch.setattr(candidates, "run_candidates",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert cli.main(argv(setup, out)) == 0
    assert len(calls) == 13 and all(c[0].name != "momentum(step_size=0.01,beta=0.9)/published"
                                    for c in calls)
    row = json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())
    _, expected = uninterrupted
    for key in ("columns", "scores", "priors", "paired", "selection", "test_trace_scores"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key


def test_restored_published_candidate_holds_its_best_iterations_kv(setup, monkeypatch):
    """When the first pass kept a later iteration (best_iteration 3 here, set in the
    JSON), the restored checkpoint holds the K/V the builder produces at iteration 3
    and the dev result of those K/V."""
    import shutil

    from vllm_deepthink.producers.deepthink import builder, dev_scoring
    from tests.helpers.tiny_models import load_tiny

    out = setup[0] / "out-e"
    assert cli.main(argv(setup, out, "--skip-search")) == 0
    path = out / "json" / "smollm2-sst2-s0.json"
    row = json.loads(path.read_text())
    row["selection"]["dt"]["candidates"][0]["best_iteration"] = 3
    path.write_text(json.dumps(row))
    shutil.rmtree(out / "work")
    saved = {}
    real = row_files.RowCheckpoints.save_candidate

    def capture(self, index, run, *rest):
        saved.setdefault(index, run)
        return real(self, index, run, *rest)

    monkeypatch.setattr(row_files.RowCheckpoints, "save_candidate", capture)
    assert cli.main(argv(setup, out)) == 0
    restored = saved[0]
    assert restored.best_iteration == 3
    demo_ids = DeepThinkAdapter.from_pretrained(
        out / "adapters" / "smollm2-sst2-s0-dt").config.demo_token_ids
    model, tokenizer = load_tiny("llama", setup[1])
    reference = builder.build_adapter(model, tokenizer, "", demo_ids=demo_ids, iterations=3,
                                      progress=False)
    for ours, theirs in zip(restored.keys + restored.values,
                            reference.keys + reference.values):
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-6)
    assert restored.best.acc == dev_scoring.score_dev(
        model, dev_scoring.DevSet.from_items(tokenizer, *_dev_items(setup, tokenizer, model)),
        restored.keys, restored.values).acc


def _dev_items(setup, tokenizer, model):
    from vllm_deepthink import tasks
    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs

    task = tasks.load_task(setup[0] / "data" / "sst2")
    inputs = task_build_inputs(task, tokenizer, model.config, seed=0, dev_size=12)
    return inputs.dev_items, inputs.content_free_items


def test_a_candidate_interrupted_mid_run_resumes_after_its_last_scored_iteration(
        setup, uninterrupted, monkeypatch):
    """A run longer than a session: the published-default candidate dies in its third dev
    pass. The next invocation takes iterations 1 and 2 (dev result and test trace) from
    cand-00.partial.json, scores only what was not scored, and writes the uninterrupted
    row."""
    from vllm_deepthink.producers.deepthink import candidates

    _, expected = uninterrupted
    published = expected["selection"]["dt"]["candidates"][0]
    assert published["iterations_run"] == 3  # so the third dev pass is candidate 0's
    out = setup[0] / "out-mid-run"
    real = candidates.score_dev
    calls = []

    class Killed(Exception):
        pass

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(candidates, "score_dev", dying)
    with pytest.raises(Killed):
        cli.main(argv(setup, out))
    monkeypatch.undo()
    work = out / "work" / "smollm2-sst2-s0"
    partial_path = work / "cand-00.partial.json"
    partial = json.loads(partial_path.read_text())
    assert [len(partial[k]) for k in ("dev", "test_trace", "test_trace_scores")] == [2, 2, 2]
    assert not (work / "cand-00.json").exists()
    # marks that survive only if the resumed run reuses these iterations
    partial["dev"][1]["seconds"] = 4321.0
    partial["test_trace"][1]["test_seconds"] = 1234.0
    partial_path.write_text(json.dumps(partial))

    dev_passes = []
    monkeypatch.setattr(candidates, "score_dev",
                        lambda *a, **k: dev_passes.append(1) or real(*a, **k))
    assert cli.main(argv(setup, out)) == 0
    row = json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())
    resumed = row["selection"]["dt"]["candidates"][0]
    assert resumed["trace"][1]["dev_seconds"] == 4321.0
    assert row["test_trace"][1]["test_seconds"] == 1234.0
    # every dev pass of the uninterrupted row (iteration 1 once, then each candidate's
    # later iterations) except the two reused ones
    candidates = expected["selection"]["dt-search"]["candidates"]
    assert len(dev_passes) == 1 + sum(c["iterations_run"] - 1 for c in candidates) - 2
    for key in ("columns", "scores", "priors", "paired", "selection", "test_trace",
                "test_trace_scores"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key


def test_a_time_budget_stops_inside_a_candidate_after_a_scored_iteration(
        setup, uninterrupted, monkeypatch, capsys):
    out = setup[0] / "out-budget-mid-run"
    clock = iter(range(0, 10_000, 40))
    monkeypatch.setattr(table, "_now", lambda: next(clock))
    # budget 150 s: start 0, row check 40, candidate 0 at 80, iteration 1 at 120,
    # iteration 2 at 160 -> stop, with iterations 1 and 2 checkpointed
    assert cli.main(argv(setup, out, "--time-budget", "150s")) == 0
    printed = capsys.readouterr().err
    assert "its 2 scored iterations are checkpointed" in printed, printed
    work = out / "work" / "smollm2-sst2-s0"
    assert sorted(p.name for p in work.iterdir()) == ["cand-00.partial.json", "zero-shot.json"]
    assert len(json.loads((work / "cand-00.partial.json").read_text())["dev"]) == 2
    monkeypatch.undo()
    assert cli.main(argv(setup, out)) == 0
    row = json.loads((out / "json" / "smollm2-sst2-s0.json").read_text())
    _, expected = uninterrupted
    for key in ("columns", "scores", "selection", "test_trace", "test_trace_scores"):
        assert strip_seconds(row[key]) == strip_seconds(expected[key]), key
