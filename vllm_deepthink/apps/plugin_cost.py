"""The plugin's own cost on a running engine: microseconds per adapter request and per
engine step in each part of our code (frontend rewrite, scheduler-side connector calls,
worker writes, background reads, output side), from the connector's always-on counters
(`connector_stats(llm)["plugin_cost"]`), for a tiny model and synthetic adapters.

    python -m vllm_deepthink.apps.plugin_cost --out results/plugin_cost.json

A profile of the same run (every engine process) is taken with py-spy:

    py-spy record --subprocesses --rate 200 -o profile.speedscope --format speedscope \\
        -- python -m vllm_deepthink.apps.plugin_cost --out /tmp/plugin_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.registration_cost import synthetic_adapters, tiny_model


def measure_plugin_cost(work: Path, num_adapters: int = 64, num_requests: int = 512,
                        prefix_len: int = 16, query_len: int = 16, max_tokens: int = 4,
                        zipf: float = 1.1, seed: int = 0) -> dict[str, Any]:
    """Serve `num_requests` token-id requests, adapters drawn Zipf(`zipf`) over
    `num_adapters`, in one `LLM.generate`; the counters' figures and the conditions."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    import vllm_deepthink
    from vllm_deepthink.plugin.api import (connector_stats, plugin_cost_delta,
                                          plugin_cost_per_request)
    from vllm_deepthink.plugin.resolvers import DirectoryResolver

    model_dir = tiny_model(work / "tiny-llama")
    store = synthetic_adapters(model_dir, work / "store", num_adapters, prefix_len)
    names = DirectoryResolver(store).names()[:num_adapters]
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32",
              enforce_eager=True, max_model_len=256, disable_log_stats=False,
              **vllm_deepthink.engine_args({name: store / name for name in names}))
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** zipf for rank in range(len(names))]
    chosen = rng.choices(names, weights, k=num_requests)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(query_len)]}
               for _ in chosen]
    params = [vllm_deepthink.sampling_params(name, max_tokens=max_tokens, detokenize=False)
              for name in chosen]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up
    before = connector_stats(llm)["plugin_cost"]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = connector_stats(llm)["plugin_cost"]
    parts = {name: {key: (round(v, 1) if key.startswith("us_") and v is not None else v)
                    for key, v in part.items()}
             for name, part in plugin_cost_delta(before, after).items()}
    per_request = plugin_cost_per_request(parts, num_requests)
    return {"what": "the plugin's own time per part, from connector_stats()['plugin_cost'] "
                    "(always-on counters of the thread's CPU time), one LLM.generate",
            "model": "random Llama, 2 layers, 2 KV heads x 64, float32, CPU",
            "adapters": len(names), "requests": num_requests, "popularity": f"Zipf({zipf})",
            "prefix_len": prefix_len, "query_len": query_len, "max_tokens": max_tokens,
            "generate_seconds": round(seconds, 2),
            "us_per_request_on_the_request_path": round(per_request, 1),
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count(), "parts": parts}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="/tmp/deepthink-registration")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--out", default="results/plugin_cost.json")


def main(args: argparse.Namespace) -> int:
    report = measure_plugin_cost(Path(args.work_dir), args.adapters, args.requests)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m vllm_deepthink.apps.plugin_cost")
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
