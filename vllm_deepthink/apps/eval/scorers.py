"""The scorer of an evaluation (`make_scorer`): `vllm` (one engine for all modes;
Deep-Thinking through the vllm_deepthink plugin, plugin/scoring.py) or `hf`
(transformers, tasks.scoring.HFScorer). Both run the same scoring plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_max_len(needed: int) -> int:
    # One generated token on top; a multiple of the CPU block size (128).
    return max(256, -(-(needed + 1) // 128) * 128)


def load_adapter_for(model_dir: str | Path, adapter_dir: str | Path):
    """The adapter, checked against the model's fingerprint."""
    from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint

    return DeepThinkAdapter.from_pretrained(
        adapter_dir, expected_fingerprint=ModelFingerprint.from_checkpoint(model_dir))


def make_scorer(engine: str, model_dir: str | Path, adapters: dict[str, Any],
                adapter_dirs: dict[str, str | Path], max_len: int, batch_size: int = 16,
                progress: bool = True, **engine_kwargs: Any):
    """An HFScorer or VllmScorer; `adapters` (name -> loaded adapter) for hf,
    `adapter_dirs` (name -> directory) for vllm."""
    if engine == "hf":
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_deepthink.tasks.scoring import HFScorer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        return HFScorer(model, adapters, batch_size=batch_size, progress=progress)
    from vllm_deepthink.plugin.scoring import VllmScorer, make_engine

    llm = make_engine(model_dir, adapters=adapter_dirs or None,
                      max_model_len=engine_max_len(max_len), **engine_kwargs)
    return VllmScorer(llm, progress=progress)
