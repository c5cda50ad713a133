"""`vllm-deepthink bench`: throughput of Deep-Thinking adapters in vLLM vs ICL, zero-shot, HF.

    vllm-deepthink bench --model models/smollm2-135m --tasks 1,8,64 --requests 512 \\
        --prefix-len 256 --query-len 32 --output-len 1 \\
        --output-json results/bench.json --plot results/bench.png

Each system runs in its own process, back to back, and that process runs every
workload (tasks x prefix length x output length), so an engine starts once per
system: `deepthink`, `icl-apc`, `icl-no-apc`, `zero-shot`, `hf-reference` (see
vllm_deepthink/apps/bench/systems.py). Each timed pass starts from an empty prefix cache.
Adapters are T=1 (plain ICL K/V of the demo ids), so `deepthink` must reproduce
`icl-apc`'s greedy tokens. `--server` measures the vLLM systems again behind
`vllm serve` with `vllm bench serve` (server_bench.py). This module parses the flags;
`run.run_benchmark` runs; the JSON schema is documented in report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from vllm_deepthink.apps.bench.run import BenchError, BenchOptions, failed_systems, run_benchmark
from vllm_deepthink.apps.bench.scale import SCALE_SYSTEMS, ScaleError, ScaleOptions
from vllm_deepthink.apps.bench.systems import SYSTEMS
from vllm_deepthink.apps.errors import UsageError

_DEFAULTS = BenchOptions(model="")
_SCALE_DEFAULTS = ScaleOptions(model="")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
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


def _adapter_lens(text: str) -> list[int | str]:
    values: list[int | str] = []
    for v in (v.strip() for v in text.split(",") if v.strip()):
        if v == "L":
            values.append("L")
        elif v.isdigit() and int(v) >= 1:
            values.append(int(v))
        else:
            values = []
            break
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated adapter lengths >= 1, or L for the demonstrations' "
            f"length, like 16,32,64,L; found {text!r}")
    return values


def _scale_systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in SCALE_SYSTEMS for n in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SCALE_SYSTEMS)}, found {text!r}")
    return names


def _reserved_cpus(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text
    raise argparse.ArgumentTypeError(f"expected a number of CPUs >= 0 or 'auto', found {text!r}")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--tasks", type=_int_list, default=d.tasks,
                        help="numbers of tasks (one adapter each), comma-separated")
    parser.add_argument("--requests", type=int, default=d.requests,
                        help="requests per timed pass")
    parser.add_argument("--prefix-len", type=_int_list, default=d.prefix_len,
                        help="demo/adapter lengths L (clipped to the model's positions)")
    parser.add_argument("--query-len", type=int, default=d.query_len,
                        help="query tokens per request")
    parser.add_argument("--output-len", type=_int_list, default=d.output_len,
                        help="generated tokens: 1 = scoring, 32 = generation")
    parser.add_argument("--systems", type=_system_list, default=d.systems,
                        help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--adapter-len", type=_adapter_lens, default=d.adapter_len,
                        help="compressed adapters: for each k (or L), also run the system "
                             "deepthink-k<k>, deepthink serving synthetic adapters of k "
                             "positions (k <= every prefix length), while the ICL systems "
                             "keep the L positions of --prefix-len; e.g. 16,32,64,L")
    parser.add_argument("--repetitions", type=int, default=d.repetitions,
                        help="timed passes per system and workload (median reported)")
    parser.add_argument("--warmup-requests", type=int, default=d.warmup_requests,
                        help="requests of the untimed warm-up pass (own queries)")
    parser.add_argument("--task-dir", default=d.task_dir,
                        help="take demos/queries from a task dir (e.g. examples/data/sst2) "
                             "instead of synthetic token ids")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--kv-cache-gib", type=int, default=d.kv_cache_gib,
                        help="VLLM_CPU_KVCACHE_SPACE for every vLLM engine (default: room for "
                             "the largest workload's prefixes, all resident, plus 1 GiB)")
    parser.add_argument("--reserved-cpus", type=_reserved_cpus, default=d.reserved_cpus,
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every vLLM engine: CPUs kept "
                             "free of OpenMP threads for the scheduler process, the same for "
                             "every system. 'auto': leave vLLM's choice (the DeepThink "
                             "connector reserves as no connector does: "
                             "plugin/patches/engine.py, patch_cpu_core_reservation)")
    parser.add_argument("--block-size", type=int, default=d.block_size,
                        help="vLLM KV block size (default: the engine's; CPU: 128)")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--hf-batch-sizes", type=_int_list, default=d.hf_batch_sizes,
                        help="batch sizes hf-reference tries (the best is reported)")
    parser.add_argument("--hf-threads", type=int, default=d.hf_threads,
                        help="torch threads of hf-reference (default: the OpenMP threads a "
                             "vLLM worker gets = usable CPUs - --reserved-cpus, at least 1)")
    parser.add_argument("--builder-iterations", type=int, default=d.builder_iterations,
                        help="Deep-Thinking iterations timed for the builder cost (0: skip)")
    parser.add_argument("--record-logprobs", action="store_true",
                        help="also record the generated tokens' logprobs (slower)")
    parser.add_argument("--save-outputs", action="store_true",
                        help="put every system's generated token ids in the JSON")
    parser.add_argument("--work-dir", default=d.work_dir,
                        help="where adapters, specs, logs and vllm bench serve results go "
                             "(default: a temp dir, removed)")
    parser.add_argument("--system-timeout", type=float, default=d.system_timeout,
                        help="seconds before a system process is killed")
    parser.add_argument("--resume", action="store_true",
                        help="with --work-dir: reuse the result of every system that already "
                             "finished there with exactly the same spec")
    parser.add_argument("--output-json", default=None,
                        help="the report; rewritten after every system")
    parser.add_argument("--plot", default=None,
                        help="PNG: requests/s relative to icl-apc; with --adapter-len, "
                             "requests/s and tasks per GiB against the adapter length k")
    parser.add_argument("--note", default=d.note,
                        help="free text stored in the JSON environment (e.g. machine load)")
    group = parser.add_argument_group("server mode (vllm serve, measured by vllm bench serve)")
    group.add_argument("--server", action="store_true",
                       help="also measure TTFT/TPOT/ITL/E2EL of the vLLM systems behind "
                            "`vllm serve`, with `vllm bench serve`")
    group.add_argument("--request-rate", type=float, default=d.request_rate,
                       help="server mode: requests per second, Poisson arrivals "
                            "(vllm bench serve --request-rate; inf: all at once)")
    group.add_argument("--server-requests", type=int, default=d.server_requests,
                       help="server mode: timed requests per system and workload")
    group.add_argument("--server-start-timeout", type=float, default=d.server_start_timeout,
                       help="server mode: seconds to wait for /health")
    scale = parser.add_argument_group(
        "scale mode (many registered adapters, Zipf popularity; scale.py)",
        "Runs instead of the throughput benchmark. It also reads --prefix-len (one value; "
        "128 unless given), --output-len (one value; 8 unless given), --query-len, "
        "--server-requests (timed requests), --warmup-requests, --request-rate, "
        "--kv-cache-gib (2 unless given), --reserved-cpus, --block-size, --max-num-seqs, "
        "--seed, --work-dir (keep it to resume), --output-json (written after every step, "
        "resumed from), --plot, --note, --server-start-timeout.")
    s = _SCALE_DEFAULTS
    scale.add_argument("--scale", action="store_true",
                       help="serve N synthetic adapters per N of --scale-adapters behind "
                            "`vllm serve` and measure deepthink and icl-apc with "
                            "`vllm bench serve`")
    scale.add_argument("--scale-adapters", type=_int_list, default=s.adapters,
                       help="numbers of registered adapters, comma-separated")
    scale.add_argument("--scale-systems", type=_scale_systems, default=s.systems,
                       help="subset of deepthink,icl-apc")
    scale.add_argument("--zipf-s", type=float, default=s.zipf_s,
                       help="Zipf exponent of adapter popularity")
    scale.add_argument("--plain-share", type=float, default=s.plain_share,
                       help="share of requests that name the base model (no adapter)")
    scale.add_argument("--resident-gib", type=float, default=s.resident_gib,
                       help="deepthink's resident budget (--deepthink-resident-gib)")
    scale.add_argument("--no-memory-baseline", dest="memory_baseline", action="store_false",
                       help="skip the 0-adapter server (no per-adapter memory, no start-up "
                            "difference)")


def _one(values: list[int], default_values: list[int], scale_default: int, flag: str) -> int:
    """A bench list flag read by the scale mode: its scale default when not given."""
    if values == default_values:
        return scale_default
    if len(values) != 1:
        raise UsageError(f"{flag}: the scale mode takes one value, found {values}")
    return values[0]


def scale_options(args: argparse.Namespace) -> ScaleOptions:
    s, d = _SCALE_DEFAULTS, _DEFAULTS
    return ScaleOptions(
        model=args.model, adapters=args.scale_adapters, systems=args.scale_systems,
        prefix_len=_one(args.prefix_len, d.prefix_len, s.prefix_len, "--prefix-len"),
        query_len=args.query_len,
        output_len=_one(args.output_len, d.output_len, s.output_len, "--output-len"),
        requests=args.server_requests, warmup_requests=args.warmup_requests,
        zipf_s=args.zipf_s, plain_share=args.plain_share, request_rate=args.request_rate,
        kv_cache_gib=args.kv_cache_gib or s.kv_cache_gib, resident_gib=args.resident_gib,
        memory_baseline=args.memory_baseline, seed=args.seed,
        reserved_cpus=args.reserved_cpus, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, work_dir=args.work_dir,
        output_json=args.output_json, server_start_timeout=args.server_start_timeout,
        note=args.note)


def main_scale(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.bench import scale

    try:
        report = scale.run_scale(scale_options(args))
    except ScaleError as exc:
        raise UsageError(str(exc)) from None
    for line in scale.summary_lines(report):
        print(line)
    if args.output_json:
        print(f"wrote {args.output_json}")
    if args.plot:
        from vllm_deepthink.apps.bench.plot import plot_scale

        try:
            print(f"wrote {plot_scale(report, args.plot)}")
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    failed = scale.failed(report)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    from vllm_deepthink.apps.bench.report import summary_lines

    if args.scale:
        return main_scale(args)
    options = BenchOptions(**{f.name: getattr(args, f.name) for f in fields(BenchOptions)})

    def write(report) -> None:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=1) + "\n")

    try:
        report = run_benchmark(options, progress=write if args.output_json else None)
    except BenchError as exc:
        raise UsageError(str(exc)) from None
    for line in summary_lines(report):
        print(line)
    if args.output_json:
        write(report)
        print(f"wrote {args.output_json}")
    if args.plot:
        from vllm_deepthink.apps.bench.plot import plot_compressed, plot_ratios

        draw = plot_compressed if options.adapter_len else plot_ratios
        try:
            print(f"wrote {draw(report, args.plot)}")
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    failed = failed_systems(report)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
