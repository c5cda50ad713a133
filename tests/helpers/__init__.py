"""Helpers shared by the tests (tiny models, adapters, a real `vllm serve`)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
