"""Shared fixtures: the tiny test checkpoints (built once per session), the built-in tasks
in small, and the converted default models (slow).

Fixture names, one per shape:
  tiny_llama_dir, tiny_gpt2_dir         Path of a tiny random checkpoint (tests/helpers/
                                        tiny_models.py), shared by every module: read it, never
                                        write into it (a test that needs another model builds
                                        its own with make_tiny_model).
  tiny_llama_loaded, tiny_gpt2_loaded   (model, tokenizer) from that checkpoint, one per module.
  data_dir                              Path of the ten built-in tasks in small.
  smollm2_dir, gemma3_dir               Path of a real converted model (slow tests).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.tiny_models import load_tiny, make_tiny_model

MODELS_DIR = REPO_ROOT / "models"
SHIPPED_DATA = REPO_ROOT / "examples" / "data"

# The built-in tasks' layouts (what `vllm-deepthink results --data-dir` reads), in small:
# classification rows {"text", "label"} with verbalizers.json; multiple-choice rows
# {"question", "choices", "label"} plus the keys COPA and WinoGrande use.
_VERBALIZERS = {"sst5": ["terrible", "negative", "neutral", "positive", "great"],
                "mr": ["negative", "positive"],
                "agnews": ["World", "Sports", "Business", "Technology"]}
_MC_ROW = {"copa": lambda i: {"question": f"The man {i} slept.", "choices": [
               f"He was tired {i}.", f"He was hungry {i}."], "label": i % 2,
               "asks_for": ("cause", "effect")[i % 2]},
           "winogrande": lambda i: {"question": f"Ann {i} helped Bo because _ was kind.",
                                    "choices": ["Ann", "Bo"], "label": i % 2},
           "openbookqa": lambda i: {"question": f"Stars {i} are", "choices": [
               "balls of gas", "cold", "small", "wet"], "label": i % 4},
           "qasc": lambda i: {"question": f"What {i} do plants need?", "choices": [
               f"light {j}" for j in range(8)], "label": i % 8},
           "hellaswag": lambda i: {"question": f"A man {i} walks to a barbell. He", "choices": [
               "lifts it.", "sings.", "swims away.", "reads a book."], "label": i % 4}}
_EVAL_SPLIT = {"sst5": "validation", "mr": "validation", "agnews": "test", "copa": "validation",
               "openbookqa": "validation", "qasc": "test", "hellaswag": "test",
               "winogrande": "test"}


def pytest_configure(config):
    """Under pytest-xdist (make test), each test process keeps to one core: its engines
    bind their OpenMP threads to a core of their own (vLLM's automatic binding puts every
    engine's worker on the same core, from its start, so two processes' engines would take
    turns on it), and its own torch and the processes it starts use one thread (with both
    cores each, two test processes oversubscribe the machine)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw"):
        return
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[int(worker[2:]) % len(cpus)])
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama (GQA, head_dim 64, seed 0) checkpoint, built once per session."""
    return make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """The tiny GPT-2 (seed 0) checkpoint, built once per session."""
    return make_tiny_model("gpt2", tmp_path_factory.getbasetemp() / "tiny-gpt2")


@pytest.fixture(scope="module")
def tiny_llama_loaded(tiny_llama_dir):
    """(model, tokenizer) of the tiny Llama, loaded once per module (a module may change
    its copy, e.g. train it; the next module loads its own)."""
    return load_tiny("llama", tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_gpt2_loaded(tiny_gpt2_dir):
    """(model, tokenizer) of the tiny GPT-2, loaded once per module."""
    return load_tiny("gpt2", tiny_gpt2_dir)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A directory of the ten built-in tasks: SST-2 and TREC as shipped in examples/data,
    the others synthesized in their real row formats (so nothing needs data from outside
    the repository)."""
    root = tmp_path_factory.mktemp("builtin-tasks")
    for name in ("sst2", "trec"):
        shutil.copytree(SHIPPED_DATA / name, root / name)
    for name, words in _VERBALIZERS.items():
        (root / name).mkdir()
        (root / name / "verbalizers.json").write_text(json.dumps(words))
        rows = [{"text": f"{name} text number {i}", "label": i % len(words)} for i in range(60)]
        _write_jsonl(root / name / "train.jsonl", rows[:48])
        _write_jsonl(root / name / f"{_EVAL_SPLIT[name]}.jsonl", rows[48:])
    for name, make in _MC_ROW.items():
        (root / name).mkdir()
        rows = [make(i) for i in range(40)]
        _write_jsonl(root / name / "train.jsonl", rows[:30])
        _write_jsonl(root / name / f"{_EVAL_SPLIT[name]}.jsonl", rows[30:])
    return root


def _converted(name: str, out: Path) -> Path:
    """convert_model under a file lock: the pytest-xdist workers of `make test` share
    <repo>/models, and two conversions into one directory would collide."""
    import fcntl

    from vllm_deepthink.tools.gguf_models import convert_model

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with open(MODELS_DIR / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert_model(name, out)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF fp32 directory, converted once into <repo>/models."""
    return _converted("smollm2", MODELS_DIR / "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma 3 270M (base) as an HF fp32 directory, converted once into <repo>/models."""
    return _converted("gemma3-270m", MODELS_DIR / "gemma3-270m")
