"""Build and compress in one call: `build_compressed_from_task` and `vllm-deepthink build
--prefix-len K | --ratio R` (and a manifest line's "compress") on a tiny Llama, no engine;
the output equals a build followed by `compress`, and the refusals come before any
weights load."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SHIPPED_DATA
from tests.helpers.manifests import write_manifest
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.apps import cli
from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.producers.compress import (CompressError, CompressSettings,
                                               DistillSettings, build_compressed_from_task,
                                               compress_for_task)
from vllm_deepthink.producers.compress.queries import queries_digest, task_queries
from vllm_deepthink.producers.deepthink.from_task import build_from_task, load_base_model
from vllm_deepthink.producers.deepthink.manifest import ManifestError, read_manifest
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
from vllm_deepthink.tasks.datasets import open_task

SST2 = SHIPPED_DATA / "sst2"
# One Deep-Thinking iteration, the last kept, one demonstration per label: fast builds.
BUILD = dict(task_dir=str(SST2), shots_per_class=1, select_on="none",
             policy=SelectionPolicy(max_iterations=1))
FAST = ["--task-dir", str(SST2), "--iterations", "1", "--select-on", "none",
        "--shots-per-class", "1"]
QUERY_TEXTS = ["Review: a charming film\nSentiment:", "Review: labored gags\nSentiment:",
               "Review: the grass was cut\nSentiment:", "Review: a dull ride\nSentiment:",
               "Review: wit and heart\nSentiment:", "Review: the sun rose\nSentiment:"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    load_tiny("llama", directory)
    return directory


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base_model(model_dir)


@pytest.fixture(scope="module")
def distilled(base):
    settings = CompressSettings(ratio=4, num_queries=24, dev_size=6, seed=0, batch_size=8,
                                distill=DistillSettings(steps=2, eval_every=1, batch_size=8))
    return settings, build_compressed_from_task(base, compress=settings, progress=False,
                                                build_args={"out": "x"}, **BUILD)


def test_build_then_compress_in_one_call(base, distilled):
    settings, adapter = distilled
    # The source as the one call built it (its build_args record the compression too).
    source = build_from_task(base, progress=False, build_args={
        "out": "x", "compress": settings.to_dict()}, **BUILD)
    cfg, record = adapter.config, adapter.config.compression
    assert cfg.method == "compressed" and adapter.prefix_len == round(source.prefix_len / 4)
    assert record["source_method"] == "deepthink"
    assert record["source_prefix_len"] == source.prefix_len
    assert record["source_config_digest"] == source.config.digest()
    assert cfg.task == source.config.task  # the task record carries over
    # The queries: the task's train rows, the demonstration rows excluded, labels unused.
    demo_rows = source.config.task["demo_indices"]
    texts, _ = task_queries(open_task(SST2), 24, 0, exclude=demo_rows)
    assert record["queries"]["digest"] == queries_digest(texts)
    assert record["queries"]["info"] == {"source": "task", "task": "sst2", "split": "train",
                                         "seed": 0, "excluded_demo_rows": len(demo_rows)}
    demos = {open_task(SST2).format_query(open_task(SST2).rows("train")[i])
             for i in demo_rows}
    assert not demos & set(texts)
    assert record["distill"]["steps_run"] == 2
    # What the build chose and how it was compressed are in build_args.
    assert cfg.build_args["compress"]["ratio"] == 4 and cfg.build_args["out"] == "x"
    assert cfg.build_args["source_build"]["selected_iteration"] == 1
    assert cfg.build_args["policy"]["max_iterations"] == 1
    # The same as a build followed by compress_for_task with the same settings.
    two_steps = compress_for_task(source, base.weights(), base.tokenizer, settings,
                                  task=open_task(SST2), progress=False)
    for a, b in zip(adapter.keys + adapter.values, two_steps.keys + two_steps.values):
        assert torch.equal(a, b)


def test_demos_text_with_given_queries(base):
    settings = CompressSettings(prefix_len=6, queries=QUERY_TEXTS, dev_size=2)
    adapter = build_compressed_from_task(base, compress=settings, progress=False,
                                         demos_text="Review: a fine film\nSentiment: positive\n\n")
    record = adapter.config.compression
    assert adapter.prefix_len == 6 and record["distill"] is None
    assert record["queries"]["info"] == {"source": "given"} and record["queries"]["count"] == 6
    assert record["queries"]["digest"] == queries_digest(QUERY_TEXTS)


@pytest.mark.parametrize("settings, sources, message", [
    (CompressSettings(prefix_len=4), {"demos_text": "Review: fine\nSentiment: positive\n"},
     "no queries to compress for: without a task"),
    (CompressSettings(prefix_len=10_000), BUILD, "`prefix_len` must be an integer in [2, "),
    (CompressSettings(ratio=1.0), BUILD, "`ratio` must be > 1"),
    (CompressSettings(prefix_len=4, ratio=2), BUILD, "exactly one of `prefix_len`"),
    (CompressSettings(prefix_len=4, teacher="calibrated"), BUILD, "add `distill`"),
    (CompressSettings(prefix_len=4, queries=QUERY_TEXTS, teacher_seeds=[0, 1],
                      distill=DistillSettings()),
     {"demos_text": "Review: fine\nSentiment: positive\n"}, "`teacher_seeds` draws"),
    (CompressSettings(prefix_len=4, distill=DistillSettings(patience=-1)), BUILD,
     "`patience` must be an integer >= 0"),
    (CompressSettings(prefix_len=4), {**BUILD, "dtype": "bfloat16"},
     "`dtype` bfloat16 with `compress`"),
])
def test_refusals_come_before_the_weights_load(model_dir, settings, sources, message):
    base = load_base_model(model_dir, dtype=sources.get("dtype", "float32"))
    with pytest.raises(CompressError) as info:
        build_compressed_from_task(base, compress=settings, progress=False, **sources)
    assert message in str(info.value), str(info.value)
    assert base._weights is None  # refused before the build


# ------------------------------------------------------------------------ the command

def build(*argv):
    return cli.main(["build", *map(str, argv)])


def test_build_prefix_len_prints_the_compress_summary(model_dir, tmp_path, capsys):
    out, summary = tmp_path / "c", tmp_path / "summary.json"
    assert build("--model", model_dir, *FAST, "--out", out, "--prefix-len", 8,
                 "--num-queries", 16, "--compress-dev-size", 4, "--distill", "--steps", 1,
                 "--eval-every", 1, "--distill-patience", 0, "--batch-size", 8,
                 "--output-json", summary) == 0
    adapter = DeepThinkAdapter.from_pretrained(out)
    record = adapter.config.compression
    assert adapter.config.method == "compressed" and adapter.prefix_len == 8
    assert record["queries"]["count"] == 16 and record["queries"]["dev"] == 4
    assert record["distill"]["settings"]["patience"] == 0
    assert record["distill"]["settings"]["batch_size"] == 8
    assert adapter.config.build_args["prefix_len"] == 8
    printed = capsys.readouterr().out
    assert printed.startswith(f"compressed {record['source_prefix_len']} -> 8 positions")
    assert f"adapter saved to {out}" in printed
    data = json.loads(summary.read_text())
    assert data["prefix_len"] == 8 and data["digest"] == adapter.digest
    assert data["source_prefix_len"] == record["source_prefix_len"]


def test_build_with_queries_file_from_demos_text(model_dir, tmp_path):
    demos, queries = tmp_path / "demos.txt", tmp_path / "q.txt"
    demos.write_text("Review: a fine film\nSentiment: positive\n\nReview: dull\nSentiment: "
                     "negative\n\n")
    queries.write_text("\n".join(QUERY_TEXTS) + "\n")
    assert build("--model", model_dir, "--demos-text", demos, "--out", tmp_path / "c",
                 "--ratio", 2, "--queries", queries, "--compress-dev-size", 2) == 0
    record = DeepThinkAdapter.from_pretrained(tmp_path / "c").config.compression
    assert record["queries"]["info"] == {"source": "file", "file": str(queries)}
    assert record["prefix_len"] == round(record["source_prefix_len"] / 2)


@pytest.mark.parametrize("extra, message", [
    (["--demos-text", "DEMOS", "--prefix-len", "4"],
     "no queries to compress for: without a task (--task-dir / --dataset, whose train rows "
     "give them) give --queries"),
    ([*FAST, "--prefix-len", "4", "--teacher", "calibrated"],
     "--teacher calibrated choose a distillation teacher; add --distill"),
    ([*FAST, "--prefix-len", "4", "--distill", "--distill-patience", "-1"],
     "--distill-patience must be an integer >= 0"),
    ([*FAST, "--prefix-len", "100000"], "--prefix-len must be an integer in [2, "),
    ([*FAST, "--distill"], "the compression flags (--queries, --distill, ...) apply with "
                           "--prefix-len K or --ratio R"),
    ([*FAST, "--prefix-len", "4", "--queries", "MISSING"], "no such queries file"),
    (["--demos-text", "DEMOS", "--prefix-len", "4", "--queries", "QUERIES", "--distill",
      "--teacher-seeds", "0,1"], "--teacher-seeds draws demonstrations"),
    ([*FAST, "--prefix-len", "4", "--teacher-seeds", "0,x"],
     "--teacher-seeds must be comma-separated integers"),
    # compress's dev split (after the build), named as build's flag, not --dev-size
    ([*FAST, "--prefix-len", "4", "--num-queries", "8", "--compress-dev-size", "8"],
     "--compress-dev-size must be in [1, 7]"),
])
def test_build_refusals_name_the_flag(model_dir, tmp_path, extra, message):
    demos, queries = tmp_path / "demos.txt", tmp_path / "q.txt"
    demos.write_text("Review: a fine film\nSentiment: positive\n\n")
    queries.write_text("\n".join(QUERY_TEXTS) + "\n")
    extra = [str(demos) if e == "DEMOS" else str(queries) if e == "QUERIES" else
             str(tmp_path / "nope") if e == "MISSING" else e for e in extra]
    with pytest.raises(SystemExit) as info:
        build("--model", model_dir, "--out", tmp_path / "c", *extra)
    assert "vllm-deepthink build: error:" in str(info.value)
    assert message in str(info.value), str(info.value)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------ manifests

def test_manifest_line_compresses_its_adapter(model_dir, tmp_path):
    line = {"name": "sst2-k8", "task_dir": str(SST2), "seed": 0, "shots_per_class": 1,
            "select_on": "none", "policy": {"max_iterations": 1},
            "compress": {"prefix_len": 8, "num_queries": 12, "dev_size": 3}}
    manifest = write_manifest(tmp_path / "m.jsonl", [line])
    assert build("--model", model_dir, "--manifest", manifest, "--out-dir", tmp_path / "store",
                 "--no-progress") == 0
    adapter = DeepThinkAdapter.from_pretrained(tmp_path / "store" / "sst2-k8")
    assert adapter.config.method == "compressed" and adapter.prefix_len == 8
    assert adapter.config.compression["queries"]["count"] == 12
    assert "digest" in adapter.config.build_args["manifest"]
    # The same line again: skipped.
    assert build("--model", model_dir, "--manifest", manifest, "--out-dir",
                 tmp_path / "store", "--no-progress") == 0
    summary = json.loads((tmp_path / "store" / "_manifest_summary.json").read_text())
    assert summary["counts"] == {"built": 0, "skipped": 1, "failed": 0}


@pytest.mark.parametrize("compress, message", [
    ({"prefix_len": 8, "shots": 2}, "\"compress\": \"compress\": unknown field 'shots'"),
    ({"prefix_len": "8"}, "`prefix_len` must be an integer, found '8'"),
    ({"prefix_len": 8, "distill": {"stpes": 3}}, "distill: unknown field 'stpes'"),
    ({"ratio": 2}, "no queries to compress for"),  # a demos_text line, no queries
])
def test_manifest_compress_field_is_checked_before_any_build(tmp_path, compress, message):
    line = {"name": "a", "model": "m", "compress": compress,
            **({"demos_text": "Review: x\nSentiment: positive\n"} if "ratio" in compress
               else {"task_dir": str(SST2)})}
    manifest = write_manifest(tmp_path / "m.jsonl", [line])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert "line 1: \"compress\"" in str(info.value) and message in str(info.value)


def test_manifest_refuses_the_compression_flags(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"name": "a", "task_dir": str(SST2)}])
    with pytest.raises(SystemExit, match="its own \"compress\" object"):
        build("--model", "m", "--manifest", manifest, "--out-dir", tmp_path / "s",
              "--prefix-len", 8)
