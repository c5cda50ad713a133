"""The frontend rewrite's CPU time per rendered text prompt, warm and with cold caches.

Run from the repository root after a scale run has written its prompts:

    .venv/bin/python results/frontend/rewrite_cache.py PROMPTS.jsonl > results/frontend/rewrite_cache.json

The tokenizer is SmolLM2's as `vllm serve` wraps it (vllm.tokenizers.hf: cached
properties, a thread pool of copies); the prompts are a scale run's timed prompts
(`{"prompt": text}` per line), rendered as vLLM's renderer renders them (the ids of the
text with the tokenizer's defaults). "cold": a 64 MiB copy before each call evicts the
caches, as the model's forward passes do between two requests under `vllm serve`.
"""

import json
import sys
import time

import numpy as np
from transformers import AutoTokenizer
from vllm.tokenizers.hf import get_cached_tokenizer, maybe_make_thread_pool

from vllm_deepthink.plugin.rewrite import query_token_ids

tokenizer = maybe_make_thread_pool(get_cached_tokenizer(
    AutoTokenizer.from_pretrained("models/smollm2-135m")))
texts = [json.loads(line)["prompt"] for line in open(sys.argv[1], encoding="utf-8")]
prompts = [{"type": "token", "prompt": t, "prompt_token_ids": tokenizer.encode(t)}
           for t in texts]
source = np.ones(64 * 2**20 // 8)
target = np.empty_like(source)
calls = {"query_token_ids": lambda p: query_token_ids(p, tokenizer),
         "tokenizer.encode": lambda p: tokenizer.encode(p["prompt"], add_special_tokens=False)}
out = {"prompts": len(prompts), "tokenizer": type(tokenizer).__name__, "cpu_us": {}}
for name, call in calls.items():
    for p in prompts[:10]:
        call(p)
    for label, cold in (("warm", False), ("cold", True)):
        total = 0
        for p in prompts:
            if cold:
                np.copyto(target, source)
            start = time.thread_time_ns()
            call(p)
            total += time.thread_time_ns() - start
        out["cpu_us"][f"{name} {label}"] = round(total / len(prompts) / 1e3, 1)
print(json.dumps(out, indent=1))
