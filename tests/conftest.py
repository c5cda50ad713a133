"""Shared fixtures: the data directory and the converted default models (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MODELS_DIR = REPO_ROOT / "models"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"task data not found at {DATA_DIR}")
    return DATA_DIR


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
