"""The benchmark as a library function: `run_benchmark(BenchOptions(model=...)) -> report`.

1. plan the workloads (tasks x prefix length x output length; prefixes clipped to the
   model's positions) and size the KV cache;
2. make every workload's request set (workload.py) and, for `deepthink` and
   `hf-reference`, one T=1 adapter per (prefix length, task) (adapters.py); time the
   builder (builder_cost.py);
3. run each offline system in its own process, back to back (processes.py, systems.py);
4. with `server`, the vLLM systems again behind `vllm serve`, measured by
   `vllm bench serve` (server_bench.py);
5. assemble the report (report.py documents its schema).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.bench import report as rep
from vllm_deepthink.apps.bench.processes import hf_threads, run_system
from vllm_deepthink.apps.processes import engine_env
from vllm_deepthink.apps.bench.systems import SYSTEMS
from vllm_deepthink.apps.bench.workload import (Workload, clip_prefix_len, make_request_set,
                                                 max_model_len)


class BenchError(ValueError):
    """Options the benchmark cannot run with; the message says what to change."""


@dataclass
class BenchOptions:
    """Every setting of one benchmark run (the `vllm-deepthink bench` flags)."""

    model: str
    tasks: list[int] = field(default_factory=lambda: [1, 8, 64])
    requests: int = 512
    prefix_len: list[int] = field(default_factory=lambda: [64, 256, 1024])
    query_len: int = 32
    output_len: list[int] = field(default_factory=lambda: [1, 32])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    repetitions: int = 3
    warmup_requests: int = 32
    task_dir: str | None = None
    seed: int = 0
    kv_cache_gib: int | None = None          # None: auto_kv_cache_gib
    reserved_cpus: str = "1"                 # a number, or "auto" (vLLM's choice)
    block_size: int | None = None
    max_num_seqs: int | None = None
    hf_batch_sizes: list[int] = field(default_factory=lambda: [4, 16, 64])
    hf_threads: int | None = None
    builder_iterations: int = 4
    record_logprobs: bool = False
    save_outputs: bool = False
    work_dir: str | None = None              # None: a temporary directory, removed
    system_timeout: float = 3600.0
    note: str = ""
    server: bool = False
    request_rate: float = 4.0
    server_requests: int = 64
    server_start_timeout: float = 300.0

    def check(self) -> Path:
        """The model directory; BenchError for options that cannot run."""
        model_dir = Path(self.model)
        if not (model_dir / "config.json").is_file():
            raise BenchError(
                f"`model` {model_dir}: expected a local HF model directory with config.json. "
                f"Create SmolLM2 with `vllm-deepthink model smollm2 --out models/smollm2-135m`.")
        for name in ("requests", "query_len", "repetitions", "warmup_requests",
                     "server_requests"):
            if getattr(self, name) < 1:
                raise BenchError(f"`{name}` must be >= 1, "
                                 f"found {getattr(self, name)}")
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown or not self.systems:
            raise BenchError(f"`systems`: expected a non-empty subset of {list(SYSTEMS)}, "
                             f"found {self.systems}")
        if not self.request_rate > 0:
            raise BenchError(f"`request_rate` must be > 0 (or inf), found {self.request_rate}")
        if self.server and importlib.util.find_spec("pandas") is None:
            raise BenchError("`server`: vllm bench serve reads its custom JSONL dataset with "
                             "pandas, which is not installed; pip install pandas (or "
                             "vllm-deepthink[bench])")
        return model_dir

    @property
    def reserved_cpu_count(self) -> int | None:
        return None if self.reserved_cpus == "auto" else int(self.reserved_cpus)


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """K and V bytes of one token over all layers (float32 engines)."""
    from transformers import AutoConfig

    from vllm_deepthink.format.hf_config import kv_geometry

    num_layers, kv_heads, head_dim = kv_geometry(AutoConfig.from_pretrained(model_dir))
    return 2 * num_layers * kv_heads * head_dim * dtype_bytes


def auto_kv_cache_gib(workloads: list[Workload], bytes_per_token: int) -> int:
    """GiB that hold every prefix of the largest workload at once, plus 1 GiB for the
    running requests: a smaller cache evicts prefixes between requests of a task."""
    prefixes = max(w.num_tasks * w.prefix_len for w in workloads)
    return 1 + -(-prefixes * bytes_per_token // (1 << 30))


def plan_workloads(options: BenchOptions, model_dir: Path) -> list[Workload]:
    from transformers import AutoConfig

    from vllm_deepthink.format.hf_config import max_positions

    positions = max_positions(AutoConfig.from_pretrained(model_dir))
    if positions is None:
        raise BenchError(f"{model_dir}/config.json gives no maximum number of positions "
                         f"(max_position_embeddings, n_positions...); cannot clip prefix "
                         f"lengths")
    prefix_lens = sorted({clip_prefix_len(p, options.query_len, max(options.output_len),
                                          positions) for p in options.prefix_len})
    return [Workload(t, p, options.query_len, o, options.requests)
            for t in sorted(set(options.tasks)) for p in prefix_lens
            for o in sorted(set(options.output_len))]


@dataclass
class Inputs:
    """What every system of the run gets: request sets by workload key, adapters by
    (prefix length, task), the tokenizer (server mode sends text)."""

    request_sets: dict[str, Any]
    warmups: dict[str, Any]
    adapter_dirs: dict[tuple[int, int], Path]
    tokenizer: Any


def prepare_inputs(options: BenchOptions, model_dir: Path, workloads: list[Workload],
                   work_dir: Path) -> tuple[Inputs, list[dict[str, Any]]]:
    """Request sets, T=1 adapters and the builder cost, from one HF model."""
    from tqdm.auto import tqdm

    from vllm_deepthink.apps.bench.adapters import build_t1_adapters, load_hf_model

    model, tokenizer = load_hf_model(model_dir)
    request_sets = {w.key: make_request_set(tokenizer, w, seed=options.seed,
                                            task_dir=options.task_dir) for w in workloads}
    warmups = {w.key: make_request_set(
        tokenizer, replace(w, num_requests=options.warmup_requests), seed=options.seed,
        task_dir=options.task_dir, query_seed_offset=1) for w in workloads}
    # Adapters depend on (prefix length, task) only: build each once.
    adapter_dirs: dict[tuple[int, int], Path] = {}
    if {"deepthink", "hf-reference"} & set(options.systems):
        widest: dict[int, Workload] = {}
        for w in workloads:
            if w.prefix_len not in widest or w.num_tasks > widest[w.prefix_len].num_tasks:
                widest[w.prefix_len] = w
        for prefix_len, w in tqdm(sorted(widest.items()), desc="T=1 adapters"):
            paths = build_t1_adapters(model, tokenizer, model_dir, request_sets[w.key].demos,
                                      work_dir / "adapters" / f"p{prefix_len}")
            adapter_dirs.update({(prefix_len, t): p for t, p in enumerate(paths)})
    cost = builder_cost(options, model, workloads, request_sets)
    del model
    gc.collect()
    return Inputs(request_sets, warmups, adapter_dirs, tokenizer), cost


def builder_cost(options: BenchOptions, model, workloads, request_sets) -> list[dict[str, Any]]:
    """One measure_builder_cost per prefix length (none below 2 iterations)."""
    if options.builder_iterations < 2:
        return []
    from vllm_deepthink.apps.bench.builder_cost import measure_builder_cost

    first = {}
    for w in workloads:
        first.setdefault(w.prefix_len, w)
    return [measure_builder_cost(model, request_sets[w.key].demos[0],
                                 iterations=options.builder_iterations)
            for w in first.values()]


def system_spec(system: str, options: BenchOptions, model_dir: Path,
                workloads: list[Workload], inputs: Inputs) -> dict[str, Any]:
    """The spec `systems.py` runs (every key is read there)."""
    specs = []
    for w in workloads:
        rs, warm = inputs.request_sets[w.key], inputs.warmups[w.key]
        specs.append({
            "key": w.key, "prefix_len": w.prefix_len, "output_len": w.output_len,
            "demos": rs.demos, "task_of": rs.task_of, "queries": rs.queries,
            "warmup": {"task_of": warm.task_of, "queries": warm.queries},
            "adapters": [str(inputs.adapter_dirs[(w.prefix_len, t)])
                         for t in range(w.num_tasks)] if inputs.adapter_dirs else [],
        })
    return {"system": system, "model": str(model_dir), "repetitions": options.repetitions,
            "hf_threads": hf_threads(options), "record_logprobs": options.record_logprobs,
            "hf_batch_sizes": options.hf_batch_sizes,
            "engine": {"max_model_len": max_model_len(workloads),
                       "block_size": options.block_size, "max_num_seqs": options.max_num_seqs},
            "workloads": specs}


def offline_runs(options: BenchOptions, workloads: list[Workload],
                 results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One report entry per workload from every system's process result."""
    runs = []
    for w in workloads:
        systems, token_ids = {}, {}
        for system in options.systems:
            process = results[system]
            if "error" in process:
                systems[system] = {"error": process["error"]}
                continue
            result = next(r for r in process["workloads"] if r["key"] == w.key)
            systems[system] = rep.system_figures(
                w, result, process, system, rep.submitted_prompt_tokens(system, w))
            token_ids[system] = result["output_token_ids"]
            if options.save_outputs:
                systems[system]["output_token_ids"] = result["output_token_ids"]
                if result.get("output_logprobs") is not None:
                    systems[system]["output_logprobs"] = result["output_logprobs"]
        runs.append(rep.run_entry(w, systems, token_ids))
    return runs


@contextlib.contextmanager
def _work_dir(path: str | None):
    if path is None:
        with tempfile.TemporaryDirectory(prefix="deepthink-bench-") as tmp:
            yield Path(tmp)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Run every system on every workload; returns the report (schema: report.py)."""
    import torch
    from tqdm.auto import tqdm

    model_dir = options.check()
    # HF work here (T=1 adapters, builder cost) uses the hf-reference thread count:
    # more OpenMP threads than free cores make every barrier wait on a busy core.
    torch.set_num_threads(hf_threads(options))
    environment = rep.environment()
    environment["note"] = options.note
    workloads = plan_workloads(options, model_dir)
    kv_cache_gib = options.kv_cache_gib or auto_kv_cache_gib(workloads,
                                                             kv_bytes_per_token(model_dir))
    env = engine_env(kv_cache_gib, options.reserved_cpu_count)
    with _work_dir(options.work_dir) as work_dir:
        inputs, cost = prepare_inputs(options, model_dir, workloads, work_dir)
        results = {system: run_system(system, system_spec(system, options, model_dir,
                                                          workloads, inputs),
                                      work_dir, options.system_timeout, env)
                   for system in tqdm(options.systems, desc="systems")}
        runs = offline_runs(options, workloads, results)
        server = None
        if options.server:
            from vllm_deepthink.apps.bench import server_bench

            server = server_bench.run_all(options, model_dir, workloads, inputs, work_dir,
                                          dict(env, VLLM_SERVER_DEV_MODE="1"))
    environment["loadavg_end"] = os.getloadavg()
    scaling = rep.task_scaling(runs)
    report = {
        "schema_version": 1,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "environment": environment,
        "settings": {"model": str(model_dir), "repetitions": options.repetitions,
                     "warmup_requests": options.warmup_requests, "seed": options.seed,
                     "task_dir": options.task_dir, "kv_cache_gib": kv_cache_gib,
                     "block_size": options.block_size, "max_num_seqs": options.max_num_seqs,
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": options.reserved_cpus,
                     "hf_batch_sizes": options.hf_batch_sizes,
                     "hf_threads": hf_threads(options), "systems": options.systems,
                     "adapters": "T=1 (the builder's first iteration over the demo ids)",
                     "dtype": "float32", "enforce_eager": True},
        "options": asdict(options),
        "definitions": rep.DEFINITIONS,
        "runs": runs,
        "task_scaling": scaling,
        "targets": rep.targets(runs, scaling),
        "builder_cost": cost,
    }
    if server is not None:
        report["server"] = server
    return report


def failed_systems(report: dict[str, Any]) -> list[str]:
    """Systems that failed on some workload, offline or in server mode."""
    runs = report["runs"] + (report.get("server") or {}).get("runs", [])
    return sorted({name for run in runs for name, fig in run["systems"].items()
                   if "error" in fig})
