"""The scripts of examples/ run as a user runs them (subprocess), on the tiny Llama.

build_adapter.py builds an adapter from a small task directory made here; the
offline and OpenAI-client examples then serve it, and their answers are checked
against HF `model(query, past_key_values=adapter)`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.references import hf_reference
from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer, engine_env
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.format import ModelFingerprint

EXAMPLES = REPO_ROOT / "examples"
QUERY = "Review: a charming film\nSentiment:"
CHOICES = [" negative", " positive"]
TASK = {"kind": "classification", "template": "Review: {text}\nSentiment: {label}",
        "label_words": ["negative", "positive"]}
REVIEWS = ["a charming film", "labored gags", "quick and lovely", "a lazy dog of a movie",
           "sharp and warm", "no wit at all", "a joy", "tedious", "bright fun", "dull"]


def run_example(script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, env=engine_env())
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    task_dir = root / "reviews"
    task_dir.mkdir()
    (task_dir / "task.json").write_text(json.dumps(TASK))
    rows = [json.dumps({"text": text, "label": 1 - n % 2}) for n, text in enumerate(REVIEWS)]
    (task_dir / "train.jsonl").write_text("\n".join(rows * 3) + "\n")
    (task_dir / "test.jsonl").write_text("\n".join(rows[:4]) + "\n")
    out = root / "store" / "reviews"
    result = run_example("build_adapter.py", "--model", tiny_llama_dir, "--task-dir",
                         task_dir, "--out", out, "--iterations", 3, "--dev-size", 8)
    assert f"{out}: prefix of" in result.stdout
    return SimpleNamespace(root=root, model_dir=tiny_llama_dir, model=model,
                           tokenizer=tokenizer, adapter_dir=out)


@pytest.mark.subprocess
def test_build_adapter_writes_an_adapter_for_the_model(built):
    adapter = DeepThinkAdapter.from_pretrained(
        built.adapter_dir, expected_fingerprint=ModelFingerprint.from_model(built.model))
    config = adapter.config
    assert config.iterations_run == 3 and 1 <= config.selected_iteration <= 3
    assert config.task["name"] == "reviews" and config.task["shots_per_class"] == 1
    assert [entry["iteration"] for entry in config.selection_trace] == [1, 2, 3]


def greedy(built, adapter, text: str, n: int) -> list[int]:
    ids = built.tokenizer(text, add_special_tokens=adapter is None)["input_ids"]
    return hf_reference(built.model, adapter, ids, num_greedy=n).greedy_tokens


@pytest.mark.engine
def test_offline_inference(built):
    output = built.root / "offline.json"
    run_example("offline_inference.py", "--model", built.model_dir, "--adapter",
                f"reviews={built.adapter_dir}", "--prompt", QUERY, "--max-tokens", 6,
                "--max-model-len", 512, "--output-json", output)
    results = {row["adapter"]: row for row in json.loads(output.read_text())}
    adapter = DeepThinkAdapter.from_pretrained(built.adapter_dir)
    assert results["reviews"]["token_ids"] == greedy(built, adapter, QUERY, 6)
    assert results[None]["token_ids"] == greedy(built, None, QUERY, 6)


@pytest.fixture(scope="module")
def server(built):
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    proc = VllmServer(built.model_dir, ["--deepthink-adapter", f"reviews={built.adapter_dir}"],
                      log_path=built.root / "server.log")
    try:
        proc.start()
        proc.wait_until_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.mark.engine
def test_openai_client(built, server):
    output = built.root / "client.json"
    result = run_example("openai_client.py", "--base-url", server.base_url + "/v1",
                         "--model", "reviews", "--prompt", QUERY, "--choices", *CHOICES,
                         "--max-tokens", 6, "--output-json", output, timeout=300)
    assert "prediction:" in result.stdout
    answer = json.loads(output.read_text())
    assert answer["model"] == "reviews"
    assert ["reviews", str(built.model_dir)] in answer["models"]
    adapter = DeepThinkAdapter.from_pretrained(built.adapter_dir)
    assert answer["text"] == built.tokenizer.decode(greedy(built, adapter, QUERY, 6))
    query_ids = built.tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    for choice in CHOICES:
        ids = built.tokenizer(QUERY + choice, add_special_tokens=False)["input_ids"]
        assert ids[:len(query_ids)] == query_ids
        reference = hf_reference(built.model, adapter, ids, num_greedy=1).prompt_logprobs
        expected = sum(reference[len(query_ids) - 1:])  # logprobs of the choice tokens
        assert answer["scores"][choice] == pytest.approx(expected, abs=1e-4)
