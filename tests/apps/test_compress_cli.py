"""`vllm-deepthink compress`: the thin CLI over compress_adapter, end to end on a tiny
Llama (no engine), and its refusals."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHIPPED_DATA
from tests.format.test_methods import imported
from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.apps import cli
from vllm_deepthink.format import DeepThinkAdapter

SST2 = SHIPPED_DATA / "sst2"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    model, tokenizer = load_tiny("llama", directory)
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def task_source(llama, tmp_path_factory):
    """A Deep-Thinking adapter built from the shipped SST-2 rows (T=1, no dev split)."""
    model_dir = llama[0]
    out = tmp_path_factory.mktemp("dt") / "sst2"
    assert cli.main(["build", "--model", str(model_dir), "--task-dir", str(SST2),
                     "--iterations", "1", "--select-on", "none", "--shots-per-class", "1",
                     "--out", str(out)]) == 0
    return out


def run(*argv):
    return cli.main(["compress", *map(str, argv)])


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--prefix-len", "--ratio", "--queries", "--distill", "--teacher-seeds"):
        assert flag in text


def test_task_queries_distilled_with_an_ensemble_teacher(llama, task_source, tmp_path,
                                                         capsys):
    model_dir = llama[0]
    out, summary = tmp_path / "c", tmp_path / "summary.json"
    assert run(task_source, "--model", model_dir, "--out", out, "--ratio", 4, "--task-dir",
               SST2, "--num-queries", 24, "--dev-size", 6, "--distill", "--steps", 2,
               "--eval-every", 1, "--batch-size", 8, "--teacher-seeds", "0,1",
               "--output-json", summary) == 0
    source = DeepThinkAdapter.from_pretrained(task_source)
    adapter = DeepThinkAdapter.from_pretrained(out)
    record = adapter.config.compression
    assert adapter.config.method == "compressed"
    assert adapter.prefix_len == round(source.prefix_len / 4)
    assert record["queries"]["count"] == 24 and record["queries"]["info"]["task"] == "sst2"
    assert record["queries"]["info"]["excluded_demo_rows"] == len(
        source.config.task["demo_indices"])
    teacher = record["distill"]["teacher"]
    assert teacher["name"] == "ensemble" and [d["seed"] for d in teacher["draws"]] == [0, 1]
    assert teacher["draws"][0]["made"] == "the source"
    assert [e["step"] for e in record["distill"]["trace"]] == [0, 1, 2]
    assert adapter.config.build_args["teacher_seeds"] == "0,1"
    data = json.loads(summary.read_text())
    assert data["prefix_len"] == adapter.prefix_len and data["digest"] == adapter.digest
    assert f"adapter saved to {out}" in capsys.readouterr().out
    # --teacher calibrated divides each draw's own label prior out, over the answer
    # tokens: the tiny tokenizer splits these labels, which begin with different tokens,
    # so the first tokens are the answer tokens.
    assert run(task_source, "--model", model_dir, "--out", tmp_path / "c-cal", "--ratio", 4,
               "--task-dir", SST2, "--num-queries", 24, "--dev-size", 6, "--distill",
               "--steps", 1, "--batch-size", 8, "--teacher-seeds", "0,1", "--teacher",
               "calibrated") == 0
    record = DeepThinkAdapter.from_pretrained(tmp_path / "c-cal").config.compression
    _, _, tokenizer = llama
    firsts = [tokenizer(w, add_special_tokens=False)["input_ids"][0]
              for w in (" negative", " positive")]
    assert record["distill"]["teacher"]["name"] == "ensemble-calibrated"
    assert record["dev"]["answer_token_ids"] == firsts
    assert len(record["distill"]["teacher"]["log_priors"]) == 2


def test_queries_file_compresses_an_imported_adapter(llama, tmp_path):
    model_dir, model, _ = llama
    source = imported(model, method="past-kv", virtual=16, specials=())
    source.save_pretrained(tmp_path / "src")
    queries = tmp_path / "queries.jsonl"
    texts = ["Review: a charming film\nSentiment:", "Question: who ?\nType:", "The lazy dog",
             "Premise: the sun", "0123456789 quick"]
    queries.write_text("".join(json.dumps(t) + "\n" for t in texts))
    assert run(tmp_path / "src", "--model", model_dir, "--out", tmp_path / "c", "--prefix-len",
               4, "--queries", queries) == 0
    record = DeepThinkAdapter.from_pretrained(tmp_path / "c").config.compression
    assert record["source_method"] == "past-kv" and record["queries"]["count"] == 5
    assert record["queries"]["info"] == {"source": "file", "file": str(queries)}


@pytest.mark.parametrize("extra, message", [
    ((), "method 'past-kv' has no task record: give --queries FILE"),
    (("--queries", "QUERIES", "--prefix-len", 16),
     "--prefix-len must be an integer in [2, 15]"),
    (("--queries", "QUERIES", "--prefix-len", 1),
     "--prefix-len must be an integer in [2, 15]"),
    (("--queries", "QUERIES", "--ratio", 0.5), "--ratio must be > 1"),
    (("--queries", "QUERIES", "--teacher", "calibrated"), "add --distill"),
    (("--queries", "QUERIES", "--distill", "--teacher-seeds", "0,1"),
     "--teacher-seeds draws demonstrations from the source's task"),
    (("--queries", "QUERIES", "--task-dir", SST2), "not both"),
    (("--queries", "MISSING"), "no such queries file"),
])
def test_refusals_name_the_flag(llama, tmp_path, extra, message):
    model_dir, model, _ = llama
    imported(model, method="past-kv", virtual=16, specials=()).save_pretrained(tmp_path / "s")
    queries = tmp_path / "q.txt"
    queries.write_text("The lazy dog\nA charming film\nWho wrote Hamlet\n")
    extra = [str(queries) if e == "QUERIES" else str(tmp_path / "nope") if e == "MISSING"
             else e for e in extra]
    if "--prefix-len" not in extra and "--ratio" not in extra:
        extra += ["--ratio", "2"]
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "s", "--model", model_dir, "--out", tmp_path / "c", *extra)
    assert "vllm-deepthink compress: error:" in str(info.value)
    assert message in str(info.value), str(info.value)
    assert not (tmp_path / "c").exists()


def test_learned_positions_are_refused(tmp_path):
    model_dir = tmp_path / "gpt2"
    model, tokenizer = load_tiny("gpt2", model_dir)
    noisy_adapter(model, tokenizer, tmp_path / "src", 24)
    queries = tmp_path / "q.txt"
    queries.write_text("The lazy dog\nA charming film\n")
    with pytest.raises(SystemExit, match="learned absolute positions"):
        run(tmp_path / "src", "--model", model_dir, "--out", tmp_path / "c", "--prefix-len", 8,
            "--queries", queries)
