"""Shared fixtures: the built-in tasks in small and the converted default models (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF fp32 directory, converted once into <repo>/models."""
    from vllm_deepthink.tools.gguf_models import convert_model

    return convert_model("smollm2", MODELS_DIR / "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma 3 270M (base) as an HF fp32 directory, converted once into <repo>/models."""
    from vllm_deepthink.tools.gguf_models import convert_model

    return convert_model("gemma3-270m", MODELS_DIR / "gemma3-270m")
