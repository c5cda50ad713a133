"""The compression table's bookkeeping: columns' k, the paired comparisons and the
agreement, the report's cells and means, the CLI's refusals (no model needed)."""

from __future__ import annotations

import argparse
import json

import pytest

from vllm_deepthink.apps.compression import paired, report
from vllm_deepthink.apps.compression.cli import add_cli_args, main
from vllm_deepthink.apps.compression.specs import COLUMNS, Column, default_rows, select_rows
from vllm_deepthink.apps.errors import UsageError


def test_columns_k_from_l():
    assert Column("a", "L/8").prefix_len(133) == 17
    assert Column("a", "L/2").prefix_len(133) == 66
    assert Column("a", "16").prefix_len(133) == 16
    assert Column("a", "L/8").prefix_len(10) == 2  # never below 2
    assert [c.name for c in COLUMNS][:4] == ["sel-L/2", "sel-L/4", "sel-L/8", "sel-16"]


def test_scored_items_are_all_or_a_random_subset_never_the_first():
    """A split stored by label (MR's is) must not give a subset of one label."""
    from vllm_deepthink.apps.compression.run import items_rule, scored_indices

    assert scored_indices(10, None) == list(range(10)) == scored_indices(10, 10)
    labels = [1] * 500 + [0] * 500  # sorted by label
    picked = scored_indices(len(labels), 500)
    assert picked == sorted(set(picked)) and len(picked) == 500
    assert picked == scored_indices(len(labels), 500)  # seeded
    assert 200 < sum(labels[i] for i in picked) < 300
    assert items_rule(None) != items_rule(500) != items_rule(400)


def test_rows_select_by_pattern():
    assert default_rows()[0].key == "smollm2-sst2-s0"
    assert [r.key for r in select_rows("gemma3-*")] == ["gemma3-270m-sst2-s0",
                                                        "gemma3-270m-mr-s0"]
    with pytest.raises(ValueError, match="matches none"):
        select_rows("nope-*")


def _row(key, source, sel, icl_dev, sel_dev=None):
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    cols = {"icl+dev": {"acc": None, "predictions": icl_dev},
            "source": {"acc": None, "predictions": source, "k": 8},
            "sel-L/2": {"acc": None, "predictions": sel, "k": 4, "teacher": None,
                        "seconds": {"build": 3.0}}}
    if sel_dev is not None:
        cols["sel-L/2"]["predictions_dev"] = sel_dev
        cols["sel-L/2"]["acc_dev"] = sum(p == y for p, y in zip(sel_dev, labels)) / 8
    for c in cols.values():
        c["acc"] = sum(p == y for p, y in zip(c["predictions"], labels)) / 8
    data = {"row": {"key": key}, "labels": labels, "columns": cols,
            "settings": {"n_test": 8, "source_len": 8}}
    paired.update(data)
    return data


def test_paired_and_agreement():
    data = _row("r", source=[0, 1, 0, 1, 1, 0, 0, 1], sel=[0, 1, 0, 1, 1, 0, 1, 0],
                icl_dev=[1, 1, 0, 1, 1, 0, 0, 0], sel_dev=[0, 1, 0, 1, 1, 0, 0, 1])
    assert data["agreement"] == {"sel-L/2": 0.75}
    vs_source = data["paired"]["sel-L/2 vs source"]
    assert vs_source["diff"] == pytest.approx(-0.25) and vs_source["discordant"] == [2, 0]
    assert data["paired"]["sel-L/2+dev vs icl+dev"]["diff"] == pytest.approx(0.25)
    assert "source vs icl+dev" in data["paired"] and "source vs source" not in data["paired"]


def test_report_cells_and_means():
    rows = [_row(f"r{i}", source=[0, 1, 0, 1, 1, 0, 0, 1], sel=[0, 1, 0, 1, 1, 0, 1, 0],
                 icl_dev=[1, 1, 0, 1, 1, 0, 0, 0]) for i in range(3)]
    rows[0]["columns"]["sel-L/4"] = {"skipped": "k >= L = 8"}
    rows[1]["columns"]["dist-L/8-cal"] = {"skipped": "teacher 'calibrated' needs ..."}
    text = report.markdown(rows)
    line = next(l for l in text.splitlines() if l.startswith("| r0 "))
    assert "| 75.0 (75% k=4) |" in line and "| k≥L |" in line and "| … |" in line
    assert "| refused† |" in next(l for l in text.splitlines() if l.startswith("| r1 "))
    assert "† r1 dist-L/8-cal: teacher 'calibrated' needs ..." in text.splitlines()
    mean = next(l for l in text.splitlines() if l.startswith("| sel-L/2 |"))
    assert "-25.0 [-25.0, -25.0] (n=3)" in mean and "| 75.0% | 3 |" in mean
    assert mean.split(" | ")[3] == "–"  # no column carries a dev-prior accuracy here
    for r in rows:  # sel-L/2+dev answers every item right; source+dev 7 of 8
        r["columns"]["sel-L/2"]["acc_dev"], r["columns"]["source"]["acc_dev"] = 1.0, 0.875
    mean = next(l for l in report.markdown(rows).splitlines() if l.startswith("| sel-L/2 |"))
    assert mean.split(" | ")[3] == "+12.5 [+12.5, +12.5] (n=3)"
    assert report.gains(rows, "sel-L/2", "icl+dev")[0] == pytest.approx(0.0)


def test_report_means_per_model_when_the_table_holds_two():
    rows = [_row("a", source=[0, 1, 0, 1, 1, 0, 0, 1], sel=[0, 1, 0, 1, 1, 0, 1, 0],
                 icl_dev=[1, 1, 0, 1, 1, 0, 0, 0]),
            _row("b", source=[0, 1, 0, 1, 1, 0, 0, 1], sel=[0, 1, 0, 1, 1, 0, 0, 1],
                 icl_dev=[1, 1, 0, 1, 1, 0, 0, 0])]
    rows[0]["row"]["model"], rows[1]["row"]["model"] = "m1", "m2"
    assert "### m1" not in report.markdown(rows[:1])
    header = report.markdown(rows).splitlines()[2]
    assert "from results/compression/json/;" in header and "Distillation steps" not in header
    rows[0]["settings"]["steps"], rows[1]["settings"]["steps"] = 240, 60
    header = report.markdown(rows, "elsewhere/json").splitlines()[2]
    assert "from elsewhere/json/;" in header and "Distillation steps: 60, 240 " in header
    lines = report.markdown(rows).splitlines()
    sections = [i for i, l in enumerate(lines) if l.startswith("### ")]
    assert [lines[i] for i in sections] == ["### All rows", "### m1", "### m2"]

    def sel_mean(section):
        return next(l for l in lines[section:] if l.startswith("| sel-L/2 |"))

    assert "-12.5 [-25.0, +0.0] (n=2)" in sel_mean(sections[0])
    assert "| -25.0 (n=1) |" in sel_mean(sections[1])
    assert "| +0.0 (n=1) |" in sel_mean(sections[2])


def _args(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(["--out", str(tmp_path), *argv])


def test_cli_refusals_and_list(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown"):
        main(_args(tmp_path, "--columns", "sel-L/3"))
    with pytest.raises(UsageError, match="--data-dir DIR is required"):
        main(_args(tmp_path, "--rows", "smollm2-sst2-s0"))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "smollm2-sst2-s0.json").write_text(json.dumps(
        {"columns": {"source": {}, "sel-L/2": {}}}))
    assert main(_args(tmp_path, "--rows", "smollm2-sst2-s*,smollm2-mr-s0", "--list")) == 0
    out = capsys.readouterr().out
    assert "smollm2-sst2-s0" in out and "1 of 9 columns" in out and "to do" in out


def test_a_row_without_an_accuracy_table_row_is_refused(tmp_path):
    from vllm_deepthink.apps.compression.run import results_row
    from vllm_deepthink.apps.results.specs import RowSpec

    with pytest.raises(UsageError, match="vllm-deepthink results --rows smollm2-mr-s1"):
        results_row(tmp_path, RowSpec("smollm2", "mr", 1))


def test_compute_row_records_a_refused_column_and_goes_on(tmp_path, monkeypatch):
    """The row loop without an engine: a column the compressor refuses is recorded with
    its reason, a column with k >= L is recorded as such, the others are computed, each
    write is a checkpoint, and a second run recomputes nothing."""
    from types import SimpleNamespace

    from vllm_deepthink.apps.compression import run
    from vllm_deepthink.apps.compression.specs import TableOptions
    from vllm_deepthink.apps.results.specs import RowSpec
    from vllm_deepthink.producers.compress import CompressError

    labels = [0, 1, 1, 0]
    table_row = {"selection": {"dt": {}}, "settings": {"split": "test"}, "labels": labels,
                 "columns": {"icl+dev": {"predictions": [0, 1, 0, 0]}}}
    inputs = run.RowInputs(task=None, inputs=None, plan=None, labels=labels, queries=[],
                           queries_info={}, choices=None, indices=[0, 1, 2, 3])

    def adapter(k):
        return SimpleNamespace(prefix_len=k, keys=[k], values=[k], config=SimpleNamespace(
            label_calibration=None, compression={"selection": {"positions": []}}))

    def compress_column(column, source, ctx, inputs_, options, shared):
        calls.append(column.name)
        if column.name == "dist-L/8-cal":
            raise CompressError("teacher 'calibrated' needs answer tokens")
        k = column.prefix_len(source.prefix_len)
        return None if column.name == "sel-16" else adapter(k)

    def score(ctx, plan, keys, values, batch_size):  # the k-position adapter answers 1
        return [[(0.0, 1), (1.0 if keys[0] != 32 else -1.0, 1)] for _ in labels]

    calls, writes = [], []
    monkeypatch.setattr(run, "results_row", lambda *a: table_row)
    monkeypatch.setattr(run, "prepare", lambda *a: inputs)
    monkeypatch.setattr(run, "rebuild_source", lambda *a: (adapter(32), {"recipe": "r"}))
    monkeypatch.setattr(run, "compress_column", compress_column)
    monkeypatch.setattr(run, "score", score)
    options = TableOptions(data_dir=tmp_path, results_dir=tmp_path,
                           columns=("sel-L/2", "sel-16", "dist-L/8-cal", "dist-16"))
    spec = RowSpec("smollm2", "sst2", 0)

    def write(path, data):
        writes.append(sorted(data["columns"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")

    data = run.compute_row(spec, None, options, tmp_path, write=write)
    cols = data["columns"]
    assert calls == ["sel-L/2", "sel-16", "dist-16", "dist-L/8-cal"]  # COLUMNS order
    assert cols["dist-L/8-cal"] == {"skipped": "teacher 'calibrated' needs answer tokens"}
    assert cols["sel-16"] == {"skipped": "k >= L = 32"}
    assert cols["sel-L/2"]["k"] == 16 and cols["sel-L/2"]["acc"] == 0.5
    assert cols["dist-16"]["predictions"] == [1, 1, 1, 1]
    assert cols["source"]["predictions"] == [0, 0, 0, 0]
    assert data["agreement"]["sel-L/2"] == 0.0 and "dist-L/8-cal" not in data["agreement"]
    assert len(writes) == 5 and "dist-16" in writes[-1]  # the source, then every column
    calls.clear()
    again = run.compute_row(spec, None, options, tmp_path, write=write)
    assert calls == [] and again["columns"] == json.loads(json.dumps(cols))


def test_plot_draws_distilled_columns_of_a_table_without_selection(tmp_path, monkeypatch):
    """A table of distilled columns only (e.g. `--columns dist-L/8 --out elsewhere`) still
    plots each row, labelled, in one colour per row."""
    from matplotlib.axes import Axes

    calls = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: calls.append((a, kw))
                        or real(self, *a, **kw))
    rows = [_row(f"r{i}", source=[0, 1, 0, 1, 1, 0, 0, 1], sel=[0, 1, 0, 1, 1, 0, 1, 0],
                 icl_dev=[1, 1, 0, 1, 1, 0, 0, 0]) for i in range(2)]
    for r in rows:
        r["columns"]["dist-L/8"] = dict(r["columns"].pop("sel-L/2"), teacher="source")
        r["columns"]["dist-L/8-cal"] = dict(r["columns"]["dist-L/8"], teacher="calibrated")
    report.plot(rows, tmp_path / "p.png")
    drawn = [(a[2], kw) for a, kw in calls if len(a) == 3 and a[2] in ("o", "s")]
    assert [m for m, _ in drawn] == ["o", "s", "o", "s"]
    assert [kw["label"] for _, kw in drawn] == ["r0", None, "r1", None]
    assert drawn[0][1]["color"] is None and drawn[1][1]["color"] is not None
    assert drawn[1][1]["color"] != drawn[3][1]["color"]
    assert (tmp_path / "p.png").stat().st_size > 0
