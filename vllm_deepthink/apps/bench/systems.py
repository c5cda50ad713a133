"""One benchmarked system in its own process: `python -m vllm_deepthink.apps.bench.systems SPEC OUT`.

Systems (same model, demos and queries):
    deepthink    vLLM + the deepthink plugin: query ids only, the request names its
                 task's adapter (the plugin puts the adapter's L positions first);
    icl-apc      vLLM, demo ids + query ids in every prompt, prefix caching on;
    icl-no-apc   the same with prefix caching off;
    zero-shot    vLLM, query ids only;
    hf-reference transformers, the adapter K/V as batched past_key_values (the
                 published code path), greedy decoding, best of a few batch sizes.

Every system: greedy decoding of exactly `output_len` tokens (EOS ignored), a
warm-up pass on a disjoint query set, then `repetitions` timed passes over the
same requests. Each pass starts with an empty prefix cache (so the first request
of a task computes the demos / loads the adapter, later ones reuse it) and
submits all requests at once; a request's latency is the time from that
submission to its completion (offline batch: queueing included).

The spec (JSON) is written by `vllm_deepthink.apps.bench.run.system_spec`; see `run()` for
the result written to OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import vllm_deepthink.plugin.api as deepthink_api

VLLM_SYSTEMS = ("deepthink", "icl-apc", "icl-no-apc", "zero-shot")
SYSTEMS = VLLM_SYSTEMS + ("hf-reference",)

# Counters read from vLLM's metrics (deltas over one timed pass).
_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
             "vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits",
             "vllm:prompt_tokens", "vllm:generation_tokens")
_SOURCES = "vllm:prompt_tokens_by_source"
# hf-reference batch sizes are capped so the batched prefix K/V stays below this.
HF_KV_BUDGET_BYTES = 2 << 30


def adapter_name(prefix_len: int, task: int) -> str:
    """Adapters depend only on (prefix length, task), so workloads share them."""
    return f"p{prefix_len}-task{task}"


def prompt_ids(system: str, demos: list[list[int]], task: int, query: list[int]) -> list[int]:
    """The token ids a system submits for one request (deepthink: the query only)."""
    if system in ("icl-apc", "icl-no-apc"):
        return demos[task] + query
    return list(query)


def _latency_stats(latencies: list[float]) -> dict[str, float]:
    import numpy as np

    p50, p99 = np.percentile(latencies, [50, 99])
    return {"latency_p50_s": float(p50), "latency_p99_s": float(p99),
            "latency_mean_s": float(np.mean(latencies))}


# ---------------------------------------------------------------- vLLM systems

def _counter_totals(llm) -> dict[str, float]:
    from vllm.v1.metrics.reader import Counter

    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not isinstance(metric, Counter):
            continue
        if metric.name in _COUNTERS:
            totals[metric.name] = totals.get(metric.name, 0) + metric.value
        elif metric.name == _SOURCES:
            key = f"{_SOURCES}:{metric.labels.get('source', '?')}"
            totals[key] = totals.get(key, 0) + metric.value
    return totals


def _make_llm(spec: dict[str, Any]):
    import vllm

    engine = spec["engine"]
    kwargs: dict[str, Any] = dict(
        model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
        max_model_len=engine["max_model_len"], disable_log_stats=False,
        enable_prefix_caching=spec["system"] != "icl-no-apc")
    for key in ("block_size", "max_num_seqs"):
        if engine.get(key):
            kwargs[key] = engine[key]
    if spec["system"] == "deepthink":
        import vllm_deepthink.plugin.api as deepthink_api

        adapters = {adapter_name(w["prefix_len"], t): path
                    for w in spec["workloads"] for t, path in enumerate(w["adapters"])}
        kwargs = deepthink_api.engine_args(adapters=adapters, **kwargs)
    return vllm.LLM(**kwargs)


def _sampling_params(system: str, workload: dict[str, Any], task: int, record_logprobs: bool):
    kwargs: dict[str, Any] = dict(max_tokens=workload["output_len"], temperature=0.0,
                                  ignore_eos=True, logprobs=0 if record_logprobs else None)
    if system == "deepthink":
        import vllm_deepthink.plugin.api as deepthink_api

        return deepthink_api.sampling_params(
            adapter=adapter_name(workload["prefix_len"], task), **kwargs)
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def _vllm_pass(llm, system: str, workload: dict[str, Any], task_of: list[int],
               queries: list[list[int]], record_logprobs: bool) -> dict[str, Any]:
    """Submit every request at once and step the engine to completion."""
    prompts = [{"prompt_token_ids": prompt_ids(system, workload["demos"], t, q)}
               for t, q in zip(task_of, queries)]
    params = [_sampling_params(system, workload, t, record_logprobs) for t in task_of]
    engine = llm.llm_engine
    before = _counter_totals(llm)
    start = time.perf_counter()
    llm.enqueue(prompts, params, use_tqdm=False)
    finished: dict[str, tuple[float, Any]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = (time.perf_counter() - start, output)
    elapsed = time.perf_counter() - start
    after = _counter_totals(llm)
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    # Outputs carry the LLM's counter ids ("0", "1", ...): numeric order = submission order.
    order = sorted(finished, key=int)
    if len(order) != len(prompts):
        raise RuntimeError(f"{len(prompts)} requests submitted, {len(order)} finished")
    outputs = [finished[r][1] for r in order]
    latencies = [finished[r][0] for r in order]
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = None
    if record_logprobs:
        logprobs = [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, ids)]
                    for o, ids in zip(outputs, token_ids)]
    return {"elapsed_s": elapsed, "latencies_s": latencies, "counters": counters,
            "engine_prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outputs),
            "token_ids": token_ids, "logprobs": logprobs}


def run_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    system = spec["system"]
    record_logprobs = spec["record_logprobs"]
    started = time.perf_counter()
    llm = _make_llm(spec)
    engine_start_s = time.perf_counter() - started
    results = []
    for workload in spec["workloads"]:
        warm = workload["warmup"]
        _vllm_pass(llm, system, workload, warm["task_of"], warm["queries"], record_logprobs)
        passes = []
        for _ in range(spec["repetitions"]):
            if not llm.reset_prefix_cache():
                raise RuntimeError("LLM.reset_prefix_cache() failed (blocks still held) "
                                   "before a timed pass; every pass must start empty")
            before = _deepthink_stats(llm, system)
            one = _vllm_pass(llm, system, workload, workload["task_of"], workload["queries"],
                             record_logprobs)
            after = _deepthink_stats(llm, system)
            one["adapter_loads"] = (None if before is None
                                    else after["adapter_loads"] - before["adapter_loads"])
            one["plugin_cost"] = (None if before is None else deepthink_api.plugin_cost_delta(
                before["plugin_cost"], after["plugin_cost"]))
            passes.append(one)
        results.append(_vllm_result(workload, passes, system))
    return {"engine_start_s": engine_start_s, "workloads": results,
            "vllm_config": {"block_size": llm.llm_engine.vllm_config.cache_config.block_size}}


def _deepthink_stats(llm, system: str) -> dict[str, Any] | None:
    """The connector's counters so far (deepthink only): adapter loads, plugin cost."""
    if system != "deepthink":
        return None
    return deepthink_api.connector_stats(llm)


def _vllm_result(workload: dict[str, Any], passes: list[dict[str, Any]], system: str
                 ) -> dict[str, Any]:
    reps = []
    for one in passes:
        counters = one["counters"]
        queries = counters.get("vllm:prefix_cache_queries", 0)
        reps.append({
            "elapsed_s": one["elapsed_s"],
            **_latency_stats(one["latencies_s"]),
            "engine_prompt_tokens": one["engine_prompt_tokens"],
            "prompt_tokens_computed": counters.get(f"{_SOURCES}:local_compute", 0),
            "prompt_tokens_local_cache_hit": counters.get(f"{_SOURCES}:local_cache_hit", 0),
            "prompt_tokens_external_loaded": counters.get(f"{_SOURCES}:external_kv_transfer", 0),
            "prefix_cache_hit_rate": (counters.get("vllm:prefix_cache_hits", 0) / queries
                                      if queries else None),
            "output_tokens": sum(len(t) for t in one["token_ids"]),
            "adapter_loads": one["adapter_loads"],
            "plugin_cost": one["plugin_cost"],
            "plugin_us_per_request": (None if one["plugin_cost"] is None else
                                      deepthink_api.plugin_cost_per_request(
                                          one["plugin_cost"], len(one["token_ids"]))),
        })
    last = passes[-1]
    return {"key": workload["key"], "repetitions": reps,
            "output_token_ids": last["token_ids"], "output_logprobs": last["logprobs"]}


# ---------------------------------------------------------------- HF reference

def _hf_pass(model, adapters, workload: dict[str, Any], task_of: list[int],
             queries: list[list[int]], batch_size: int, record_logprobs: bool
             ) -> dict[str, Any]:
    import torch

    from vllm_deepthink.format import hf_cache

    output_len = workload["output_len"]
    n = len(queries)
    token_ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    latencies = [0.0] * n
    # Batches hold queries of one length; rows may belong to different tasks.
    by_length: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_length.setdefault(len(q), []).append(i)
    batches = [rows[s:s + batch_size] for rows in by_length.values()
               for s in range(0, len(rows), batch_size)]
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in batches:
            cache = hf_cache.cache_from_kv([
                (torch.stack([adapters[task_of[r]].keys[layer] for r in rows]),    # [B, H, L, D]
                 torch.stack([adapters[task_of[r]].values[layer] for r in rows]))
                for layer in range(adapters[0].num_layers)], model.config, len(rows))
            input_ids = torch.tensor([queries[r] for r in rows])                # [B, q]
            for _ in range(output_len):
                out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                step_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
                next_ids = step_logprobs.argmax(dim=-1)                         # [B]
                for j, r in enumerate(rows):
                    token_ids[r].append(int(next_ids[j]))
                    if record_logprobs:
                        logprobs[r].append(float(step_logprobs[j, next_ids[j]]))
                input_ids = next_ids[:, None]                                   # [B, 1]
            done = time.perf_counter() - start
            for r in rows:
                latencies[r] = done
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "latencies_s": latencies, "token_ids": token_ids,
            "logprobs": logprobs if record_logprobs else None}


def _hf_batch_candidates(spec, workload, adapters) -> list[int]:
    """Batch sizes to try, capped so the batched prefix K/V stays under the budget."""
    first = adapters[0]
    fp = first.config.fingerprint
    bytes_per_row = (2 * fp.num_layers * fp.num_kv_heads * fp.head_dim
                     * (workload["prefix_len"] + len(workload["queries"][0]) + workload["output_len"])
                     * first.keys[0].element_size())
    n = len(workload["queries"])
    sizes = sorted({min(b, n) for b in spec["hf_batch_sizes"]
                    if b * bytes_per_row <= HF_KV_BUDGET_BYTES or b == 1})
    return sizes or [1]


def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vllm_deepthink.format import DeepThinkAdapter
    from vllm_deepthink.apps.bench.adapters import load_hf_model
    from vllm_deepthink.apps.bench.measure import summarize

    record_logprobs = spec["record_logprobs"]
    torch.set_num_threads(spec["hf_threads"])
    started = time.perf_counter()
    model, _ = load_hf_model(spec["model"])
    engine_start_s = time.perf_counter() - started
    results = []
    for workload in spec["workloads"]:
        adapters = [DeepThinkAdapter.from_pretrained(p) for p in workload["adapters"]]
        warm = workload["warmup"]
        _hf_pass(model, adapters, workload, warm["task_of"], warm["queries"], 4, False)
        # Tuning: two batches of each candidate size from the timed requests (HF keeps
        # no cache between passes, so reusing them does not favour anyone).
        tuning = {}
        for batch_size in _hf_batch_candidates(spec, workload, adapters):
            count = min(len(workload["queries"]), 2 * batch_size)
            timed = _hf_pass(model, adapters, workload, workload["task_of"][:count],
                             workload["queries"][:count], batch_size, False)
            tuning[batch_size] = count / timed["elapsed_s"]
        best = max(tuning, key=tuning.get)
        passes = []
        # The requested repetitions, then up to two more while the spread exceeds 10 %.
        max_reps = spec["repetitions"] + 2
        while len(passes) < max_reps:
            passes.append(_hf_pass(model, adapters, workload, workload["task_of"],
                                   workload["queries"], best, record_logprobs))
            if len(passes) >= spec["repetitions"] and (
                    len(passes) < 2
                    or summarize([p["elapsed_s"] for p in passes])["rel_spread"] <= 0.10):
                break
        q_tokens = sum(len(q) for q in workload["queries"])
        reps = [{"elapsed_s": p["elapsed_s"], **_latency_stats(p["latencies_s"]),
                 "prompt_tokens_computed": q_tokens,
                 "output_tokens": sum(len(t) for t in p["token_ids"])} for p in passes]
        results.append({"key": workload["key"], "repetitions": reps,
                        "batch_size": best,
                        "batch_size_tuning_requests_per_s": {str(k): v for k, v in tuning.items()},
                        "output_token_ids": passes[-1]["token_ids"],
                        "output_logprobs": passes[-1]["logprobs"]})
    return {"engine_start_s": engine_start_s, "workloads": results,
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- entry point

def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm_deepthink.apps.bench.measure import PeakRSS

    system = spec["system"]
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")
    load_before = os.getloadavg()
    with PeakRSS() as rss:
        result = run_hf(spec) if system == "hf-reference" else run_vllm(spec)
    result.update(system=system, peak_rss_bytes=rss.peak_bytes,
                  loadavg_before=load_before, loadavg_after=os.getloadavg())
    if "torch_threads" not in result:
        import torch

        result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m vllm_deepthink.apps.bench.systems SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
