"""Throughput benchmarks (`vllm-deepthink bench`): cli.py parses and orchestrates,
systems.py runs one system per process, server_bench.py the same over HTTP,
workload.py / report.py / plot.py / measure.py the rest."""
