"""T=1 Deep-Thinking adapters for the benchmark, built by the builder itself.

One Deep-Thinking iteration is plain ICL, so the adapter the builder makes from demo
ids with iterations=1 is exactly the K/V an ICL prompt computes for those ids; that
makes `deepthink` and `icl-apc` outputs comparable token for token. The builder gets
the demo ids themselves (not text), so synthetic or clipped demos need not survive a
decode/encode round trip.
"""

from __future__ import annotations

from pathlib import Path


def load_hf_model(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def build_t1_adapters(model, tokenizer, model_dir: str | Path, demos: list[list[int]],
                      out_dir: str | Path) -> list[Path]:
    """Save one T=1 adapter per demo list under out_dir/task{t}; returns the paths."""
    from vllm_deepthink.producers.deepthink.builder import build_adapter

    paths = []
    for t, demo_ids in enumerate(demos):
        adapter = build_adapter(model, tokenizer, tokenizer.decode(demo_ids),
                                demo_ids=demo_ids, iterations=1,
                                base_model_name_or_path=str(model_dir), progress=False,
                                build_args={"built_by": "vllm-deepthink bench (T=1)"})
        paths.append(adapter.save_pretrained(Path(out_dir) / f"task{t}"))
    return paths
