"""`bench --scale`: many registered adapters behind `vllm serve`, a Zipf-popular workload.

For each N of `ScaleOptions.adapters`, N synthetic adapters of L positions
(scale_workload.py) are served from one `--deepthink-adapter-dir`, and each system runs
the same request stream through `vllm bench serve` (server_bench.py's client):

    deepthink  the request names its adapter (`model`), the prompt is the query alone;
               plain requests name the base model;
    icl-apc    the request carries adapter k's demonstrations (L synthetic word tokens,
               BOS first) before the query, prefix caching on; plain requests the query.

Request i names adapter `scale_requests(...)[i]`: round(plain_share * n) plain requests,
the others Zipf(zipf_s) over the N adapters; the warm-up is another stream of the same
law. Per (N, system), one server: the time from start to a healthy server, the API
server's RSS (the `vllm serve` process itself; the engine core is its child), the
latency of GET /v1/models, then warm-up, POST /reset_prefix_cache, the timed run, and
the deltas of /metrics counters over it (adapter loads = prefix-cache misses of an
adapter request, reads = resident-store misses, prefix-cache queries and hits).
Every server has the same KV cache (VLLM_CPU_KVCACHE_SPACE) and deepthink the same
resident budget (--deepthink-resident-gib). A deepthink server over an empty adapter
directory is the memory and start-up baseline.

The report is written to `output_json` after every (N, system) and read back on the
next run with the same settings: finished entries are kept, so a long run resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.bench import server_bench as sb
from vllm_deepthink.apps.bench.measure import uptime
from vllm_deepthink.apps.bench.scale_workload import (adapter_dir_of, adapter_label,
                                                      scale_requests,
                                                      write_synthetic_adapters)
from vllm_deepthink.plugin.api import plugin_cost_delta, plugin_cost_per_request

SCALE_SYSTEMS = ("deepthink", "icl-apc")
DEFINITIONS = {
    "runs[N][system]": "one server per N and system; the vllm bench serve figures of "
                       "server_bench.FIELDS and p50/p99 TTFT/TPOT/ITL/E2EL in ms",
    "startup_s": "seconds from starting `vllm serve` to the first 200 on /health",
    "api_server_rss_bytes": "RSS of the `vllm serve` (API server) process once healthy; "
                            "the engine core is a child process and not counted",
    "api_server_bytes_per_adapter": "deepthink: (api_server_rss_bytes - baseline's) / N",
    "startup_beyond_baseline_s": "deepthink: startup_s - the baseline's startup_s",
    "models_list": "GET /v1/models: entries listed, median and max latency in ms",
    "adapter_loads": "deepthink: requests whose adapter K/V was written into the KV cache "
                     "over the timed run (prefix-cache misses), from /metrics",
    "adapter_reads": "deepthink: adapters read from disk over the timed run (resident-store "
                     "misses), from /metrics",
    "resident_hit_rate": "deepthink: 1 - adapter_reads / adapter_loads (None without loads)",
    "prefix_cache_hit_rate": "vllm:prefix_cache_hits / vllm:prefix_cache_queries over the "
                             "timed run (tokens)",
    "plugin_cost": "deepthink: the plugin's own time per part over the timed run, from the "
                   "/metrics cost counters (plugin.api.plugin_cost_delta): microseconds, "
                   "requests and steps it counted, us_per_request, us_per_step",
    "plugin_us_per_request": "deepthink: the plugin's microseconds on the request path (every "
                             "part but worker_read, the background reads) per adapter request",
    "baseline": "a deepthink server over an empty --deepthink-adapter-dir",
}


class ScaleError(ValueError):
    """Scale options that cannot run; the message names the parameter."""


@dataclass
class ScaleOptions:
    """Every setting of one scale run (`vllm-deepthink bench --scale` flags)."""

    model: str
    adapters: list[int] = field(default_factory=lambda: [16, 256, 1024, 4096])
    systems: list[str] = field(default_factory=lambda: list(SCALE_SYSTEMS))
    prefix_len: int = 128
    query_len: int = 32
    output_len: int = 8
    requests: int = 128
    warmup_requests: int = 32
    zipf_s: float = 1.1
    plain_share: float = 0.1
    request_rate: float = math.inf
    kv_cache_gib: int = 2
    resident_gib: float = 0.25
    memory_baseline: bool = True
    models_list_calls: int = 5
    seed: int = 0
    reserved_cpus: str = "1"
    block_size: int | None = None
    max_num_seqs: int | None = None
    work_dir: str | None = None       # None: a temporary directory, removed
    output_json: str | None = None    # written after every (N, system); resumed from
    server_start_timeout: float = 3600.0
    note: str = ""

    def check(self) -> Path:
        model_dir = Path(self.model)
        if not (model_dir / "config.json").is_file():
            raise ScaleError(f"`model` {model_dir}: expected a local HF model directory "
                             f"with config.json")
        for name in ("prefix_len", "query_len", "output_len", "requests", "warmup_requests",
                     "kv_cache_gib", "models_list_calls"):
            if getattr(self, name) < 1:
                raise ScaleError(f"`{name}` must be >= 1, found {getattr(self, name)}")
        if not self.adapters or any(n < 1 for n in self.adapters):
            raise ScaleError(f"`adapters` must be numbers >= 1, found {self.adapters}")
        unknown = sorted(set(self.systems) - set(SCALE_SYSTEMS))
        if unknown or not self.systems:
            raise ScaleError(f"`systems`: expected a non-empty subset of "
                             f"{list(SCALE_SYSTEMS)}, found {self.systems}")
        if not 0 <= self.plain_share <= 1:
            raise ScaleError(f"`plain_share` must be in [0, 1], found {self.plain_share}")
        if self.zipf_s < 0 or self.resident_gib <= 0 or not self.request_rate > 0:
            raise ScaleError(f"`zipf_s` must be >= 0, `resident_gib` and `request_rate` > 0; "
                             f"found {self.zipf_s}, {self.resident_gib}, {self.request_rate}")
        return model_dir

    def measured_settings(self) -> dict[str, Any]:
        """The settings a resumed report must share (everything that changes a figure)."""
        skip = {"adapters", "systems", "work_dir", "output_json", "server_start_timeout",
                "note", "memory_baseline"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---------------------------------------------------------------- prompts

def _word_ids(tokenizer) -> tuple[list[int], int]:
    from vllm_deepthink.apps.bench.workload import _bos_id, word_token_ids

    return word_token_ids(tokenizer), _bos_id(tokenizer)


def demo_ids(tokenizer, index: int, prefix_len: int, seed: int) -> list[int]:
    """icl-apc's demonstrations of adapter `index`: BOS + L-1 seeded word tokens."""
    words, bos = _word_ids(tokenizer)
    rng = random.Random(f"scale-demos-{seed}-{index}")
    return [bos] + [rng.choice(words) for _ in range(prefix_len - 1)]


def request_prompts(tokenizer, system: str, picks: list[int | None], options: ScaleOptions,
                    stream: str) -> tuple[list[str], list[str]]:
    """(prompt texts, model names) of a request stream for one system."""
    words, _ = _word_ids(tokenizer)
    rng = random.Random(f"scale-queries-{options.seed}-{stream}")
    texts, names = [], []
    for pick in picks:
        ids = [rng.choice(words) for _ in range(options.query_len)]
        if system == "icl-apc" and pick is not None:
            ids = demo_ids(tokenizer, pick, options.prefix_len, options.seed) + ids
        texts.append(tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        names.append(adapter_label(pick) if system == "deepthink" and pick is not None
                     else sb.BASE_NAME)
    return texts, names


# ---------------------------------------------------------------- one server

def serve_args(system: str, options: ScaleOptions, adapter_dir: Path | None) -> list[str]:
    args = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--enable-prefix-caching",
            "--max-model-len", str(options.prefix_len + options.query_len + options.output_len),
            "--served-model-name", sb.BASE_NAME]
    if options.block_size:
        args += ["--block-size", str(options.block_size)]
    if options.max_num_seqs:
        args += ["--max-num-seqs", str(options.max_num_seqs)]
    if system == "deepthink":
        args += ["--deepthink-adapter-dir", str(adapter_dir),
                 "--deepthink-resident-gib", str(options.resident_gib)]
    return args


def models_list(server, calls: int) -> dict[str, Any]:
    latencies, entries = [], None
    for _ in range(calls):
        start = time.perf_counter()
        payload = server.admin("GET", "/v1/models")
        latencies.append((time.perf_counter() - start) * 1000)
        entries = len(json.loads(payload)["data"])
    return {"entries": entries, "calls": calls, "median_ms": statistics.median(latencies),
            "max_ms": max(latencies)}


def api_server_rss(server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


COUNTERS = {"adapter_loads": sb.LOADS_METRIC, "adapter_reads": sb.READS_METRIC,
            "prefix_cache_queries": "vllm:prefix_cache_queries",
            "prefix_cache_hits": "vllm:prefix_cache_hits"}


def counters(server) -> dict[str, float]:
    return {key: sb.counter_total(server, metric) for key, metric in COUNTERS.items()}


def derived(figures: dict[str, Any]) -> dict[str, Any]:
    """Hit rates and rates per second of the counter deltas in `figures`."""
    loads, reads = figures["adapter_loads"], figures["adapter_reads"]
    queries, duration = figures["prefix_cache_queries"], figures["duration"]
    has = loads is not None and duration
    return {"resident_hit_rate": 1 - reads / loads if loads else None,
            "reads_per_s": reads / duration if has else None,
            "loads_per_s": loads / duration if has else None,
            "prefix_cache_hit_rate": figures["prefix_cache_hits"] / queries if queries else None}


def start_server(system: str, options: ScaleOptions, model_dir: Path, adapter_dir, env,
                 log: Path) -> tuple[Any, dict[str, Any]]:
    """A healthy server and its start-up figures (the caller stops it)."""
    from vllm_deepthink.apps.processes import Server

    server = Server(model_dir, serve_args(system, options, adapter_dir), log_path=log,
                    env=env, start_timeout=options.server_start_timeout)
    start = time.monotonic()
    server.start()
    try:
        server.wait_until_healthy()
    except BaseException:
        server.stop()
        raise
    figures = {"startup_s": time.monotonic() - start, "api_server_rss_bytes": api_server_rss(server),
               "models_list": models_list(server, options.models_list_calls)}
    return server, figures


def measure(system: str, num_adapters: int, options: ScaleOptions, model_dir: Path,
            tokenizer, adapter_dir: Path, env: dict[str, str], work_dir: Path
            ) -> dict[str, Any]:
    """Start-up, memory, /v1/models and the timed vllm bench serve run of one server."""
    phase = work_dir / "scale" / f"n{num_adapters}-{system}"
    log = work_dir / "logs" / f"scale-n{num_adapters}-{system}.log"
    timed = scale_requests(num_adapters, options.requests, zipf_s=options.zipf_s,
                           plain_share=options.plain_share, seed=options.seed)
    warm = scale_requests(num_adapters, options.warmup_requests, zipf_s=options.zipf_s,
                          plain_share=options.plain_share, seed=options.seed, stream="warmup")
    figures: dict[str, Any] = {"uptime_before": uptime(), "loadavg_before": os.getloadavg()}
    server, start_figures = start_server(system, options, model_dir, adapter_dir, env, log)
    figures.update(start_figures)
    with _stopping(server):
        texts, names = request_prompts(tokenizer, system, warm, options, "warmup")
        sb.run_bench_serve(sb.bench_serve_argv(
            server, model_dir, sb.write_dataset(phase / "warmup.jsonl", texts), len(texts),
            options.output_len, request_rate=math.inf, seed=options.seed, adapters=names,
            result=None), log.with_suffix(".bench.log"))
        server.reset_prefix_cache()
        texts, names = request_prompts(tokenizer, system, timed, options, "timed")
        result_path = phase / "result.json"
        argv = sb.bench_serve_argv(
            server, model_dir, sb.write_dataset(phase / "timed.jsonl", texts), len(texts),
            options.output_len, request_rate=options.request_rate, seed=options.seed,
            adapters=names, result=result_path)
        before, cost_before = counters(server), sb.plugin_cost_counters(server)
        sb.run_bench_serve(argv, log.with_suffix(".bench.log"))
        after, cost_after = counters(server), sb.plugin_cost_counters(server)
        figures["api_server_rss_bytes_after"] = api_server_rss(server)
    result = json.loads(result_path.read_text())
    figures.update({key: result[key] for key in sb.FIELDS})
    figures.update({k: v for k, v in result.items() if sb.LATENCY_FIELD.match(k)})
    figures.update({key: after[key] - before[key] for key in COUNTERS})
    if system != "deepthink":  # no connector: its counters do not exist
        figures.update(adapter_loads=None, adapter_reads=None)
    else:
        cost = plugin_cost_delta(cost_before, cost_after)
        figures.update(plugin_cost=cost, plugin_us_per_request=plugin_cost_per_request(
            cost, sum(p is not None for p in timed)))
    figures.update(derived(figures))
    figures.update(
        requests=len(timed), plain_requests=sum(p is None for p in timed),
        adapter_requests=sum(p is not None for p in timed),
        distinct_adapters_requested=len({p for p in timed if p is not None}),
        errors=[e for e in result["errors"] if e][:5], result_file=str(result_path),
        uptime_after=uptime(), loadavg_after=os.getloadavg())
    return figures


@contextlib.contextmanager
def _stopping(server):
    try:
        yield server
    finally:
        server.stop()


def measure_baseline(options: ScaleOptions, model_dir: Path, env, work_dir: Path
                     ) -> dict[str, Any]:
    empty = work_dir / "adapter-dirs" / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    figures = {"uptime_before": uptime()}
    server, start_figures = start_server("deepthink", options, model_dir, empty, env,
                                         work_dir / "logs" / "scale-baseline.log")
    server.stop()
    return {**figures, **start_figures}


# ---------------------------------------------------------------- the run

def _load_previous(options: ScaleOptions) -> dict[str, Any] | None:
    path = Path(options.output_json) if options.output_json else None
    if path is None or not path.is_file():
        return None
    previous = json.loads(path.read_text())
    if previous.get("settings") != options.measured_settings():
        raise ScaleError(
            f"`output_json` {path} holds a scale run with other settings "
            f"({previous.get('settings')}); resume with the same settings or write another "
            f"file")
    return previous


def _save(report: dict[str, Any], options: ScaleOptions) -> None:
    report["summary"] = summary(report)
    if options.output_json:
        path = Path(options.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per N: requests/s and TTFT of each system, deepthink's per-adapter cost."""
    rows = []
    baseline = report.get("baseline")
    for key in sorted(report["runs"], key=int):
        row: dict[str, Any] = {"adapters": int(key)}
        for system, fig in report["runs"][key].items():
            if "error" in fig:
                row[system] = {"error": fig["error"][:200]}
                continue
            row[system] = {k: fig.get(k) for k in (
                "request_throughput", "p50_ttft_ms", "p99_ttft_ms", "startup_s",
                "resident_hit_rate", "reads_per_s", "prefix_cache_hit_rate",
                "plugin_us_per_request")}
            row[system]["models_list_median_ms"] = fig["models_list"]["median_ms"]
            if system == "deepthink" and baseline and "error" not in baseline:
                row[system]["api_server_bytes_per_adapter"] = (
                    fig["api_server_rss_bytes"] - baseline["api_server_rss_bytes"]) / int(key)
                row[system]["startup_beyond_baseline_s"] = (
                    fig["startup_s"] - baseline["startup_s"])
        rows.append(row)
    return rows


def run_scale(options: ScaleOptions) -> dict[str, Any]:
    """Every (N, system) of `options` not already in `options.output_json`; returns the
    report (written after each step when `output_json` is set)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vllm_deepthink.apps.bench import report as rep
    from vllm_deepthink.apps.bench.run import _work_dir
    from vllm_deepthink.apps.processes import engine_env

    model_dir = options.check()
    report = _load_previous(options) or {
        "schema_version": 1, "kind": "scale",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv, "environment": rep.environment(),
        "settings": options.measured_settings(), "definitions": DEFINITIONS, "runs": {}}
    report["environment"].setdefault("uptime", []).append(uptime())
    report["environment"]["note"] = options.note
    reserved = None if options.reserved_cpus == "auto" else int(options.reserved_cpus)
    env = engine_env(options.kv_cache_gib, reserved, VLLM_SERVER_DEV_MODE="1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _work_dir(options.work_dir) as work_dir:
        if options.memory_baseline and "error" in report.get("baseline", {"error": ""}):
            try:
                report["baseline"] = measure_baseline(options, model_dir, env, work_dir)
            except Exception as exc:
                report["baseline"] = {"error": f"{type(exc).__name__}: {exc}"}
            _save(report, options)
        for n in tqdm(sorted(options.adapters), desc="adapters"):
            entry = report["runs"].setdefault(str(n), {})
            todo = [s for s in options.systems if s not in entry or "error" in entry[s]]
            if not todo:
                continue
            adapter_dir = None
            if "deepthink" in todo:
                store = work_dir / "adapters" / f"L{options.prefix_len}-seed{options.seed}"
                paths = write_synthetic_adapters(model_dir, store, n, options.prefix_len,
                                                 options.seed)
                adapter_dir = adapter_dir_of(paths, work_dir / "adapter-dirs" / f"n{n}")
            for system in todo:
                try:
                    entry[system] = measure(system, n, options, model_dir, tokenizer,
                                            adapter_dir, env, work_dir)
                except Exception as exc:
                    entry[system] = {"error": f"{type(exc).__name__}: {exc}"}
                _save(report, options)
    report["environment"]["loadavg_end"] = os.getloadavg()
    _save(report, options)
    return report


def failed(report: dict[str, Any]) -> list[str]:
    """(N, system) entries that hold an error."""
    return [f"{n}:{system}" for n, systems in report["runs"].items()
            for system, fig in systems.items() if "error" in fig]


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = ["adapters  system     req/s   TTFT p50 ms  p99 ms  resident hit  startup s  "
             "plugin us/req"]
    for row in report["summary"]:
        for system in SCALE_SYSTEMS:
            fig = row.get(system)
            if fig is None:
                continue
            if "error" in fig:
                lines.append(f"{row['adapters']:>8}  {system:<9}  error: {fig['error']}")
                continue
            hit = fig["resident_hit_rate"]
            lines.append(f"{row['adapters']:>8}  {system:<9}  {fig['request_throughput']:6.2f}  "
                         f"{fig['p50_ttft_ms']:11.0f}  {fig['p99_ttft_ms']:6.0f}  "
                         f"{'-' if hit is None else f'{hit:.2f}':>12}  {fig['startup_s']:9.1f}  "
                         f"{'-' if (us := fig.get('plugin_us_per_request')) is None else f'{us:.1f}':>13}")
    return lines
