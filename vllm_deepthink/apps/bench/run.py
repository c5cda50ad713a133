"""The benchmark as a library function: `run_benchmark(BenchOptions(model=...)) -> report`.

1. plan the workloads (tasks x prefix length x output length; prefixes clipped to the
   model's positions) and size the KV cache;
2. make every workload's request set (workload.py) and, for `deepthink` and
   `hf-reference`, one T=1 adapter per (prefix length, task) (adapters.py); for each
   adapter length k of `adapter_len`, synthetic adapters of k positions
   (scale_workload.py; the `deepthink-k<k>` systems); time the builder (builder_cost.py);
3. run each offline system in its own process, back to back (processes.py, systems.py),
   reusing a finished system's result with `resume`;
4. with `server`, the vLLM systems again behind `vllm serve`, measured by
   `vllm bench serve` (server_bench.py);
5. assemble the report (report.py documents its schema; memory.py the memory section),
   also after every system for `run_benchmark(..., progress=callback)`.
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
from typing import Any, Callable

from vllm_deepthink.apps.bench import memory
from vllm_deepthink.apps.bench import report as rep
from vllm_deepthink.apps.bench.memory import (adapter_len_of, base_system, compressed_label,
                                               kv_bytes_per_token)
from vllm_deepthink.apps.bench.measure import uptime
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
    # Adapter lengths k of the compressed systems `deepthink-k<k>` (ints, or "L": the
    # demonstrations' length); ICL systems keep the L of `prefix_len`.
    adapter_len: list[int | str] = field(default_factory=list)
    resume: bool = False                     # reuse finished systems' results in work_dir

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
        for k in self.adapter_len:
            if k != "L" and not (isinstance(k, int) and k >= 1):
                raise BenchError(f"`adapter_len` values must be integers >= 1 or 'L' (the "
                                 f"demonstrations' length), found {k!r}")
        if len(set(self.adapter_len)) != len(self.adapter_len):
            raise BenchError(f"`adapter_len` lists a length twice: {self.adapter_len}")
        if self.resume and self.work_dir is None:
            raise BenchError("`resume` needs a `work_dir` (where finished systems' results "
                             "are kept)")
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

    @property
    def all_systems(self) -> list[str]:
        """`systems`, then one `deepthink-k<k>` per adapter length."""
        return list(self.systems) + [compressed_label(k) for k in self.adapter_len]


def check_adapter_lens(adapter_len: list[int | str], prefix_lens: list[int]) -> None:
    """A compressed adapter is no longer than its demonstrations: k <= every L of the run."""
    too_long = [k for k in adapter_len if k != "L" and k > min(prefix_lens)]
    if too_long:
        raise BenchError(
            f"`adapter_len` {too_long} exceeds the prefix length {min(prefix_lens)} (after "
            f"clipping to the model's positions): an adapter compresses its L demonstration "
            f"positions into k <= L. Use a shorter adapter length or 'L'.")


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
    # synthetic adapters of k positions by k, one per task (the deepthink-k<k> systems)
    synthetic_dirs: dict[int, list[Path]] = field(default_factory=dict)


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
    synthetic_dirs = synthetic_adapters(options, model_dir, workloads, work_dir)
    cost = builder_cost(options, model, workloads, request_sets)
    del model
    gc.collect()
    return Inputs(request_sets, warmups, adapter_dirs, tokenizer, synthetic_dirs), cost


def synthetic_adapters(options: BenchOptions, model_dir: Path, workloads: list[Workload],
                       work_dir: Path) -> dict[int, list[Path]]:
    """Per adapter length k of the run, one synthetic adapter of k positions per task
    (seeded random K/V imported as past-kv, distinct digests: scale_workload.py). Their
    values do not matter for throughput: the engine's work depends on k, not on them."""
    from vllm_deepthink.apps.bench.scale_workload import write_synthetic_adapters

    count = max(w.num_tasks for w in workloads)
    lengths = sorted({adapter_len_of(compressed_label(k), w.prefix_len)
                      for k in options.adapter_len for w in workloads})
    return {k: write_synthetic_adapters(model_dir, work_dir / "adapters" / f"k{k}", count,
                                        k, seed=options.seed) for k in lengths}


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


def _adapter_paths(system: str, w: Workload, inputs: Inputs) -> list[str]:
    k = adapter_len_of(system, w.prefix_len)
    if k is not None:
        return [str(p) for p in inputs.synthetic_dirs[k][:w.num_tasks]]
    if not inputs.adapter_dirs:
        return []
    return [str(inputs.adapter_dirs[(w.prefix_len, t)]) for t in range(w.num_tasks)]


def system_spec(system: str, options: BenchOptions, model_dir: Path,
                workloads: list[Workload], inputs: Inputs) -> dict[str, Any]:
    """The spec `systems.py` runs (every key is read there). A `deepthink-k<k>` system
    runs as `deepthink` with the synthetic adapters of k positions."""
    specs = []
    for w in workloads:
        rs, warm = inputs.request_sets[w.key], inputs.warmups[w.key]
        specs.append({
            "key": w.key, "prefix_len": w.prefix_len, "output_len": w.output_len,
            "adapter_len": adapter_len_of(system, w.prefix_len),
            "demos": rs.demos, "task_of": rs.task_of, "queries": rs.queries,
            "warmup": {"task_of": warm.task_of, "queries": warm.queries},
            "adapters": _adapter_paths(system, w, inputs),
        })
    return {"system": base_system(system), "model": str(model_dir), "repetitions": options.repetitions,
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
        for system in [s for s in options.all_systems if s in results]:
            process = results[system]
            if "error" in process:
                systems[system] = {"error": process["error"]}
                continue
            result = next(r for r in process["workloads"] if r["key"] == w.key)
            systems[system] = rep.system_figures(
                w, result, process, system, rep.submitted_prompt_tokens(system, w))
            if adapter_len_of(system, w.prefix_len) is not None:
                systems[system]["adapter_len"] = adapter_len_of(system, w.prefix_len)
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


def run_benchmark(options: BenchOptions,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every system on every workload; returns the report (schema: report.py).
    `progress`, when given, receives the report of the systems finished so far after
    each one (e.g. to write the JSON as the run goes)."""
    import torch
    from tqdm.auto import tqdm

    model_dir = options.check()
    # HF work here (T=1 adapters, builder cost) uses the hf-reference thread count:
    # more OpenMP threads than free cores make every barrier wait on a busy core.
    torch.set_num_threads(hf_threads(options))
    environment = rep.environment()
    environment["note"] = options.note
    workloads = plan_workloads(options, model_dir)
    check_adapter_lens(options.adapter_len, [w.prefix_len for w in workloads])
    bytes_per_token = kv_bytes_per_token(model_dir)
    kv_cache_gib = options.kv_cache_gib or auto_kv_cache_gib(workloads, bytes_per_token)
    env = engine_env(kv_cache_gib, options.reserved_cpu_count)
    results: dict[str, dict[str, Any]] = {}

    def assemble(server=None) -> dict[str, Any]:
        return _report(options, model_dir, environment, workloads, results, kv_cache_gib,
                       bytes_per_token, cost, server)

    with _work_dir(options.work_dir) as work_dir:
        inputs, cost = prepare_inputs(options, model_dir, workloads, work_dir)
        for system in tqdm(options.all_systems, desc="systems"):
            results[system] = run_system(system, system_spec(system, options, model_dir,
                                                             workloads, inputs),
                                         work_dir, options.system_timeout, env,
                                         reuse=options.resume)
            if progress is not None:
                progress(assemble())
        server = None
        if options.server:
            from vllm_deepthink.apps.bench import server_bench

            server = server_bench.run_all(options, model_dir, workloads, inputs, work_dir,
                                          dict(env, VLLM_SERVER_DEV_MODE="1"))
    environment["loadavg_end"] = os.getloadavg()
    environment["uptime_end"] = uptime()
    return assemble(server)


def _report(options: BenchOptions, model_dir: Path, environment: dict[str, Any],
            workloads: list[Workload], results: dict[str, dict[str, Any]], kv_cache_gib: int,
            bytes_per_token: int, cost: list[dict[str, Any]], server: dict[str, Any] | None
            ) -> dict[str, Any]:
    runs = offline_runs(options, workloads, results)
    scaling = rep.task_scaling(runs)
    memory_section = memory.memory_report(options.all_systems,
                                          [w.prefix_len for w in workloads], bytes_per_token)
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
                     "hf_threads": hf_threads(options), "systems": options.all_systems,
                     "adapter_len": options.adapter_len,
                     "adapters": "T=1 (the builder's first iteration over the demo ids)",
                     "compressed_adapters": "deepthink-k<k>: synthetic adapters of k "
                                            "positions (seeded random K/V, one per task)",
                     "dtype": "float32", "enforce_eager": True},
        "options": asdict(options),
        "definitions": rep.DEFINITIONS,
        "systems_done": [s for s in options.all_systems if s in results],
        "runs": runs,
        "task_scaling": scaling,
        "memory": memory_section,
        "targets": rep.targets(runs, scaling) + rep.compressed_targets(runs, memory_section),
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
