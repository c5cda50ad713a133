"""Throughput benchmarks (`vllm-deepthink bench`): cli.py parses, run.py runs
(`run_benchmark`), systems.py runs one offline system per process, server_bench.py the
vLLM systems behind `vllm serve` measured by `vllm bench serve` (the `vllm serve`
subprocess and the engine environment: apps/processes.py); workload.py / adapters.py / report.py /
plot.py / measure.py the rest."""
