"""T=1 Deep-Thinking adapters for the benchmark: the HF forward K/V of the demo ids.

One Deep-Thinking iteration is plain ICL, so the adapter built from demo ids
with T=1 is exactly the K/V an ICL prompt computes for those ids; that makes
`deepthink` and `icl-apc` outputs comparable token for token. Demo ids are used
directly (not text) so synthetic demos need not survive a decode/encode round trip.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig, dtype_name
from vllm_deepthink.format import ModelFingerprint


def load_hf_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def t1_adapter(model, tokenizer, demo_ids: list[int], base_model: str) -> DeepThinkAdapter:
    """The adapter whose K/V are the model's cache after a forward pass over demo_ids."""
    input_ids = torch.tensor([demo_ids])                       # [1, L]
    cache = model(input_ids=input_ids, use_cache=True).past_key_values
    keys, values = [], []
    for key, value, *_ in cache:                               # each [1, H_kv, L, D]
        keys.append(key[0].contiguous())
        values.append(value[0].contiguous())
    config = DeepThinkConfig(
        base_model_name_or_path=str(base_model),
        fingerprint=ModelFingerprint.from_model(model),
        prefix_len=len(demo_ids),
        dtype=dtype_name(keys[0].dtype),
        demos_text=tokenizer.decode(demo_ids),
        demo_token_ids=list(demo_ids),
        optimizer="momentum",
        optimizer_params={"step_size": 0.01, "beta": 0.9},
        position_mode="published",
        iterations_run=1,
        selected_iteration=1,
        build_args={"built_by": "vllm_deepthink.apps.bench.adapters.t1_adapter"},
    )
    return DeepThinkAdapter(config=config, keys=keys, values=values)


def build_t1_adapters(model_dir: str | Path, demos: list[list[int]], out_dir: str | Path,
                      model=None, tokenizer=None) -> list[Path]:
    """Save one T=1 adapter per demo list under out_dir/task{t}; returns the paths."""
    if model is None:
        model, tokenizer = load_hf_model(model_dir)
    paths = []
    for t, demo_ids in enumerate(demos):
        adapter = t1_adapter(model, tokenizer, demo_ids, str(model_dir))
        paths.append(adapter.save_pretrained(Path(out_dir) / f"task{t}"))
    return paths
