"""Helpers shared by the tests: tiny models (tiny_models), noisy test adapters
(adapter_factory), HF references (references), test engines and the parity check
(engines), a real `vllm serve` (openai_server)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
