"""Shared fixtures: the data directory and the converted default models (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
MODELS_DIR = REPO_ROOT / "models"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"task data not found at {DATA_DIR}")
    return DATA_DIR
