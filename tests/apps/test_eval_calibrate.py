"""`vllm-deepthink eval --calibrate` with the HF engine (no vLLM engine): the JSON holds
per-choice scores and priors from which every calibrated number is recomputed."""

from __future__ import annotations

import json

import pytest

from vllm_deepthink.apps import cli
from vllm_deepthink.tasks import calibration

TEXTS = ["a charming film", "contains no wit , only labored gags", "the quick brown fox",
         "lazy dog", "the sun was rising", "the grass was cut", "a film", "who wrote Hamlet"]


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("evalcal")
    model_dir = tiny_llama_dir
    task = base / "sent"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({
        "kind": "classification", "template": "Review: {text}\nSentiment: {label}",
        "label_words": ["negative", "positive"]}))
    rows = [{"text": TEXTS[i % len(TEXTS)] + f" {i}", "label": i % 2} for i in range(50)]
    (task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    adapter = base / "adapter"
    assert cli.main(["build", "--model", str(model_dir), "--task-dir", str(task),
                     "--shots-per-class", "1", "--iterations", "3", "--dev-size", "10",
                     "--out", str(adapter)]) == 0
    return base, model_dir, task, adapter


def run_eval(built, method):
    base, model_dir, task, adapter = built
    out = base / f"eval-{method}.json"
    if not out.is_file():
        assert cli.main(["eval", "--model", str(model_dir), "--task-dir", str(task),
                         "--adapter", str(adapter), "--engine", "hf", "--calibrate", method,
                         "--no-progress", "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["content-free", "dev-prior"])
def test_eval_calibrate_json_recomputes(built, method):
    result = run_eval(built, method)
    cal = result["calibration"]
    assert result["schema_version"] == 2 and cal["method"] == method
    if method == "dev-prior":
        assert cal["dev_size"] == 10 and cal["dev_source"] == "the adapter's dev split (10 train rows)"
    else:
        assert cal["inputs"][0] == "Review: N/A\nSentiment:"
    for mode in ("zero-shot", "icl", "deepthink"):
        scores = [[(s, n) for s, n in zip(row, lengths)]
                  for row, lengths in zip(result["scores"][mode], result["choice_tokens"])]
        prior = cal["log_prior"][mode]
        lengths = result["choice_tokens"][0]  # the label words: the same for every item
        assert calibration.log_prior([[(s, n) for s, n in zip(row, lengths)]
                                      for row in cal["scores"][mode]]) == pytest.approx(prior)
        preds = calibration.calibrated_predictions(scores, prior)
        assert preds == result["predictions_calibrated"][mode]
        acc = sum(p == y for p, y in zip(preds, result["labels"])) / len(preds)
        assert result["metrics"][mode]["acc_calibrated"] == acc
    # ICL and Deep-Thinking are calibrated with their own priors
    assert cal["log_prior"]["zero-shot"] != cal["log_prior"]["icl"]


def test_dev_prior_prior_equals_the_adapters_build_time_calibration(built):
    """The adapter carries the dev-prior of its kept iteration, computed at build time
    on the same dev split that eval --calibrate dev-prior rebuilds."""
    from vllm_deepthink.format import DeepThinkAdapter

    adapter = built[3]
    result = run_eval(built, "dev-prior")
    carried = DeepThinkAdapter.from_pretrained(adapter).config.label_calibration
    assert carried["dev-prior"]["log_prior"] == pytest.approx(
        result["calibration"]["log_prior"]["deepthink"], abs=1e-5)
    assert carried["dev-prior"]["n"] == 10


def test_calibrating_a_multiple_choice_task_is_refused(built, tmp_path):
    _, model_dir, _, _ = built
    task = tmp_path / "mc"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"kind": "multiple_choice",
                                                "template": "{question} {choice}"}))
    row = {"question": "the sun", "choices": ["was rising", "is"], "label": 0}
    (task / "train.jsonl").write_text(json.dumps(row) + "\n")
    (task / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="fixed label set"):
        cli.main(["eval", "--model", str(model_dir), "--task-dir", str(task), "--engine", "hf",
                  "--calibrate", "content-free", "--no-progress"])


def test_dev_prior_refuses_the_evaluated_split(built):
    """Without an adapter's dev record, eval --calibrate dev-prior draws from --dev-split,
    which may not be the split being evaluated."""
    base, model_dir, task, _ = built
    with pytest.raises(SystemExit, match="'test' is the split being evaluated.*from 'train'"):
        cli.main(["eval", "--model", str(model_dir), "--task-dir", str(task), "--engine", "hf",
                  "--calibrate", "dev-prior", "--dev-split", "test", "--no-progress"])
    with pytest.raises(SystemExit, match="has no 'validation' split"):
        cli.main(["eval", "--model", str(model_dir), "--task-dir", str(task), "--engine", "hf",
                  "--calibrate", "dev-prior", "--dev-split", "validation", "--no-progress"])


def test_dev_prior_of_an_adapter_selected_on_the_evaluated_split_is_refused(tmp_path):
    """An adapter built with --dev-split validation chose T on validation: its dev prior
    is not estimated for an eval of that same split."""
    from types import SimpleNamespace

    from vllm_deepthink.apps.eval.calibrate import calibration_items
    from vllm_deepthink.apps.eval.modes import EvalError
    from vllm_deepthink.tasks import load_task

    d = tmp_path / "sent"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({
        "kind": "classification", "template": "Review: {text}\nSentiment: {label}",
        "label_words": ["negative", "positive"]}))
    for split, n in (("train", 20), ("validation", 12), ("test", 6)):
        (d / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"{split} {i}", "label": i % 2}) + "\n" for i in range(n)))
    task = load_task(d)
    record = {"dev_size": 5, "seed": 0, "demo_indices": [0, 1], "dev_split": "validation"}
    adapter = SimpleNamespace(config=SimpleNamespace(task=record))
    items, info = calibration_items(task, None, "dev-prior", adapter, evaluated="test")
    assert info == {"dev_size": 5, "dev_source": "the adapter's dev split (5 validation rows)"}
    assert all(item.query.startswith("Review: validation") for item in items)
    with pytest.raises(EvalError, match="drawn from 'validation', the split being evaluated"):
        calibration_items(task, None, "dev-prior", adapter, evaluated="validation")
