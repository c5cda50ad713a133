"""`vllm-deepthink bench`: throughput of Deep-Thinking adapters in vLLM vs ICL, zero-shot, HF.

    vllm-deepthink bench --model models/smollm2-135m --tasks 1,8,64 --requests 512 \\
        --prefix-len 256 --query-len 32 --output-len 1 \\
        --output-json results/bench.json --plot results/bench.png

Each system runs in its own process, back to back, and that process runs every
workload (tasks x prefix length x output length), so an engine starts once per
system: `deepthink`, `icl-apc`, `icl-no-apc`, `zero-shot`, `hf-reference` (see
vllm_deepthink/bench/systems.py). Each timed pass starts from an empty prefix cache. Adapters are T=1 (plain
ICL K/V of the demo ids), so `deepthink` must reproduce `icl-apc`'s greedy tokens.
The JSON schema is documented in vllm_deepthink/bench/report.py.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.bench.processes import hf_threads, run_system
from vllm_deepthink.apps.bench.systems import SYSTEMS
from vllm_deepthink.apps.bench.workload import Workload, clip_prefix_len, make_request_set


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 1,8,64, found {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 1,8,64, found {text!r}")
    return values


def _system_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown systems {unknown or text!r}; expected a comma-separated subset of "
            f"{','.join(SYSTEMS)}")
    return names


def _reserved_cpus(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text
    raise argparse.ArgumentTypeError(f"expected a number of CPUs >= 0 or 'auto', found {text!r}")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--tasks", type=_int_list, default=[1, 8, 64],
                        help="numbers of tasks (one adapter each), comma-separated")
    parser.add_argument("--requests", type=int, default=512, help="requests per timed pass")
    parser.add_argument("--prefix-len", type=_int_list, default=[64, 256, 1024],
                        help="demo/adapter lengths L (clipped to the model's positions)")
    parser.add_argument("--query-len", type=int, default=32, help="query tokens per request")
    parser.add_argument("--output-len", type=_int_list, default=[1, 32],
                        help="generated tokens: 1 = scoring, 32 = generation")
    parser.add_argument("--systems", type=_system_list, default=list(SYSTEMS),
                        help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="timed passes per system and workload (median reported)")
    parser.add_argument("--warmup-requests", type=int, default=32,
                        help="requests of the untimed warm-up pass (own queries)")
    parser.add_argument("--task-dir", default=None,
                        help="take demos/queries from a task dir (e.g. ../shared/data/sst2) "
                             "instead of synthetic token ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=int, default=None,
                        help="VLLM_CPU_KVCACHE_SPACE for every vLLM engine (default: room for "
                             "the largest workload's prefixes, all resident, plus 1 GiB)")
    parser.add_argument("--reserved-cpus", type=_reserved_cpus, default="1",
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every vLLM engine: CPUs kept "
                             "free of OpenMP threads for the scheduler process, the same for "
                             "every system. 'auto': leave vLLM's choice (the DeepThink "
                             "connector reserves as no connector does: compat."
                             "patch_cpu_core_reservation)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="vLLM KV block size (default: the engine's; CPU: 128)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--hf-batch-sizes", type=_int_list, default=[4, 16, 64],
                        help="batch sizes hf-reference tries (the best is reported)")
    parser.add_argument("--hf-threads", type=int, default=None,
                        help="torch threads of hf-reference (default: the OpenMP threads a "
                             "vLLM worker gets = usable CPUs - --reserved-cpus, at least 1)")
    parser.add_argument("--builder-iterations", type=int, default=4,
                        help="Deep-Thinking iterations timed for the builder cost (0: skip)")
    parser.add_argument("--record-logprobs", action="store_true",
                        help="also record the generated tokens' logprobs (slower)")
    parser.add_argument("--save-outputs", action="store_true",
                        help="put every system's generated token ids in the JSON")
    parser.add_argument("--work-dir", default=None,
                        help="where adapters, specs and logs go (default: a temp dir, removed)")
    parser.add_argument("--system-timeout", type=float, default=3600.0,
                        help="seconds before a system process is killed")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--plot", default=None, help="PNG: requests/s relative to icl-apc")
    parser.add_argument("--note", default="",
                        help="free text stored in the JSON environment (e.g. machine load)")
    from vllm_deepthink.apps.bench import server_bench

    server_bench.add_cli_args(parser)


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


def _model_max_positions(model_dir: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(text, name, None)
        if value:
            return int(value)
    raise ValueError(f"{model_dir}/config.json has no max_position_embeddings/n_positions; "
                     f"cannot clip prefix lengths")


def plan_workloads(args, max_positions: int) -> list[Workload]:
    prefix_lens = sorted({clip_prefix_len(p, args.query_len, max(args.output_len), max_positions)
                          for p in args.prefix_len})
    return [Workload(t, p, args.query_len, o, args.requests)
            for t in sorted(set(args.tasks)) for p in prefix_lens
            for o in sorted(set(args.output_len))]


def _check_args(args) -> Path:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(
            f"--model {model_dir}: expected a local HF model directory with config.json. "
            f"Create SmolLM2 with `vllm-deepthink model smollm2 --out models/smollm2-135m`.")
    for name in ("requests", "query_len", "repetitions"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.warmup_requests < 1:
        raise SystemExit(f"--warmup-requests must be >= 1, found {args.warmup_requests}")
    return model_dir


def _spec(system: str, args, model_dir: Path, group: list[Workload], request_sets, warmups,
          adapter_dirs) -> dict[str, Any]:
    max_len = max(w.prefix_len + w.query_len + w.output_len for w in group)
    workloads = []
    for w in group:
        rs, warm = request_sets[w.key], warmups[w.key]
        workloads.append({
            "key": w.key, "prefix_len": w.prefix_len, "output_len": w.output_len,
            "demos": rs.demos, "task_of": rs.task_of, "queries": rs.queries,
            "warmup": {"task_of": warm.task_of, "queries": warm.queries},
            "adapters": [str(adapter_dirs[(w.prefix_len, t)]) for t in range(w.num_tasks)]
            if adapter_dirs else [],
        })
    return {"system": system, "model": str(model_dir), "repetitions": args.repetitions,
            "hf_threads": hf_threads(args),
            "record_logprobs": args.record_logprobs, "hf_batch_sizes": args.hf_batch_sizes,
            "engine": {"max_model_len": max_len, "kv_cache_gib": args.kv_cache_gib,
                       "block_size": args.block_size, "max_num_seqs": args.max_num_seqs},
            "workloads": workloads}


def main(args) -> int:
    from tqdm.auto import tqdm

    from vllm_deepthink.apps.bench import report as rep
    from vllm_deepthink.apps.bench.adapters import build_t1_adapters, load_hf_model

    model_dir = _check_args(args)
    import torch

    # HF work here (T=1 adapters, builder cost) uses the hf-reference thread count:
    # more OpenMP threads than free cores make every barrier wait on a busy core.
    torch.set_num_threads(hf_threads(args))
    environment = rep.environment()
    environment["note"] = args.note
    workloads = plan_workloads(args, _model_max_positions(model_dir))
    if args.kv_cache_gib is None:
        args.kv_cache_gib = auto_kv_cache_gib(workloads, kv_bytes_per_token(model_dir))
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="deepthink-bench-")
        work_dir = Path(tmp.name)
    else:
        work_dir = Path(args.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_hf_model(model_dir)
    request_sets = {w.key: make_request_set(tokenizer, w, seed=args.seed, task_dir=args.task_dir)
                    for w in workloads}
    warmups = {w.key: make_request_set(
        tokenizer, replace(w, num_requests=args.warmup_requests), seed=args.seed,
        task_dir=args.task_dir, query_seed_offset=1) for w in workloads}

    # Adapters depend on (prefix length, task) only: build each once.
    adapter_dirs: dict[tuple[int, int], Path] = {}
    if {"deepthink", "hf-reference"} & set(args.systems):
        widest: dict[int, Workload] = {}
        for w in workloads:
            if w.prefix_len not in widest or w.num_tasks > widest[w.prefix_len].num_tasks:
                widest[w.prefix_len] = w
        for prefix_len, w in tqdm(sorted(widest.items()), desc="T=1 adapters"):
            demos = request_sets[w.key].demos
            paths = build_t1_adapters(model_dir, demos, work_dir / "adapters" / f"p{prefix_len}",
                                      model=model, tokenizer=tokenizer)
            adapter_dirs.update({(prefix_len, t): p for t, p in enumerate(paths)})

    builder_cost = _builder_cost(args, model, workloads, request_sets)
    del model
    gc.collect()

    groups = {"all": workloads}  # one process per system for the whole run
    results: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = [(g, s) for g in groups for s in args.systems]
    for group_key, system in tqdm(jobs, desc="systems"):
        spec = _spec(system, args, model_dir, groups[group_key], request_sets, warmups,
                     adapter_dirs)
        results[(group_key, system)] = run_system(system, group_key, spec, work_dir,
                                                   args.system_timeout, args)

    runs = []
    for group_key, group in groups.items():
        for w in group:
            systems, token_ids = {}, {}
            for system in args.systems:
                process = results[(group_key, system)]
                if "error" in process:
                    systems[system] = {"error": process["error"]}
                    continue
                result = next(r for r in process["workloads"] if r["key"] == w.key)
                systems[system] = rep.system_figures(
                    w, result, process, system, rep.submitted_prompt_tokens(system, w))
                token_ids[system] = result["output_token_ids"]
                if args.save_outputs:
                    systems[system]["output_token_ids"] = result["output_token_ids"]
                    if result.get("output_logprobs") is not None:
                        systems[system]["output_logprobs"] = result["output_logprobs"]
            runs.append(rep.run_entry(w, systems, token_ids))

    environment["loadavg_end"] = os.getloadavg()
    scaling = rep.task_scaling(runs)
    report = {
        "schema_version": 1,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "environment": environment,
        "settings": {"model": str(model_dir), "repetitions": args.repetitions,
                     "warmup_requests": args.warmup_requests, "seed": args.seed,
                     "task_dir": args.task_dir, "kv_cache_gib": args.kv_cache_gib,
                     "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": args.reserved_cpus,
                     "hf_batch_sizes": args.hf_batch_sizes, "hf_threads": hf_threads(args),
                     "systems": args.systems,
                     "adapters": "T=1 (HF forward K/V of the demo ids)",
                     "dtype": "float32", "enforce_eager": True},
        "definitions": rep.DEFINITIONS,
        "runs": runs,
        "task_scaling": scaling,
        "targets": rep.targets(runs, scaling),
        "builder_cost": builder_cost,
    }
    if args.server:
        from vllm_deepthink.apps.bench import server_bench

        report["server"] = server_bench.run_all(args, model_dir, workloads, request_sets,
                                                warmups, adapter_dirs, work_dir)
    for line in rep.summary_lines(report):
        print(line)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output_json}")
    if args.plot:
        from vllm_deepthink.apps.bench.plot import plot_ratios

        try:
            print(f"wrote {plot_ratios(report, args.plot)}")
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    failed = [name for run in runs for name, fig in run["systems"].items() if "error" in fig]
    return 1 if failed else 0


def _builder_cost(args, model, workloads, request_sets) -> list[dict[str, Any]]:
    if args.builder_iterations < 2:
        return []
    from vllm_deepthink.apps.bench.builder_cost import measure_builder_cost

    out = []
    done = set()
    for w in workloads:
        if w.prefix_len in done:
            continue
        done.add(w.prefix_len)
        try:
            out.append(measure_builder_cost(model, request_sets[w.key].demos[0],
                                            iterations=args.builder_iterations))
        except ImportError as exc:
            out.append({"prefix_len": w.prefix_len, "error": f"builder not available: {exc}"})
    return out
