"""The re-rotation identity on the real converted models: writes
results/compression/rotation_check.json (read in results/README.md, "Compression").

    .venv/bin/python results/compression/rotation_check.py [--models-dir models]

tests/producers/test_compress_selection.py asserts the identity on tiny random models
(tiny Llama, tiny Gemma-3-style local/global RoPE); models/ is not in CI, so this script
measures it on the real weights and configs. A real prefix (SST-2-style demonstrations,
100 tokens) keeps every third position and the sink; its kept keys are rotated by
-(L-k) (positions.shift_keys, as `compress` does) and a query then runs at position k.
The reference is the query at L over the full source prefix with every dropped position
masked out: the same attention, so the logits should agree to float32 rounding. The
unrotated keys are reported beside it (what the query would see without the rotation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_deepthink.format import hf_cache
from vllm_deepthink.producers.compress import positions, selection
from vllm_deepthink.producers.compress.batches import forward_after_prefix

HERE = Path(__file__).resolve().parent
DEMOS = ("Review: a charming film\nSentiment: positive\n\n"
         "Review: contains no wit , only labored gags\nSentiment: negative\n\n")
QUERY = "Review: the quick brown fox\nSentiment:"
PREFIX_TOKENS = 100


@torch.no_grad()
def query_logits(model, prefix, query_ids, attention_mask=None) -> torch.Tensor:
    """[S, vocab] float64 logits of one query after a per-layer (key, value) prefix."""
    if attention_mask is None:
        return forward_after_prefix(model, prefix, [query_ids]).logits(model).double()
    cache = hf_cache.cache_from_kv([(k[None], v[None]) for k, v in prefix], model.config)
    out = model(torch.tensor([query_ids]), attention_mask=attention_mask,
                past_key_values=cache, use_cache=True)
    return out.logits[0].double()


def check(path: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(DEMOS * 4, add_special_tokens=True)["input_ids"][:PREFIX_TOKENS]
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    prefix = [(layer.keys[0].clone(), layer.values[0].clone())
              for layer in out.past_key_values.layers]  # per layer [kv_heads, L, head_dim]
    L = len(ids)
    kept = sorted({0, *range(1, L, 3)})
    k = len(kept)
    where = torch.tensor(kept).expand(len(prefix), prefix[0][0].shape[0], k)
    keys = selection.gather_positions([p[0] for p in prefix], where)
    values = selection.gather_positions([p[1] for p in prefix], where)
    query = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(1, L + len(query), dtype=torch.long)
    mask[0, kept] = 1
    mask[0, L:] = 1
    reference = query_logits(model, prefix, query, attention_mask=mask)
    rotated = query_logits(model, list(zip(positions.shift_keys(model, keys, L), values)), query)
    unrotated = query_logits(model, list(zip(keys, values)), query)
    logp = lambda x: torch.log_softmax(x, dim=-1)  # noqa: E731
    return {"model": path.name, "L": L, "k": k, "query_tokens": len(query),
            "layer_types": sorted(set(getattr(model.config, "layer_types", None) or ["full"])),
            "max_abs_logit_diff_rotated": (rotated - reference).abs().max().item(),
            "max_abs_logprob_diff_rotated": (logp(rotated) - logp(reference)).abs().max().item(),
            "max_abs_logit_diff_unrotated": (unrotated - reference).abs().max().item(),
            "same_argmax_rotated": bool((rotated.argmax(-1) == reference.argmax(-1)).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(HERE.parent.parent / "models"))
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--out", default=str(HERE / "rotation_check.json"))
    args = parser.parse_args()
    rows = [check(Path(args.models_dir) / name) for name in args.models.split(",")]
    for row in rows:
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"command": "results/compression/rotation_check.py",
                                          "torch": torch.__version__, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
