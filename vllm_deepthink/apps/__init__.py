"""Applications over the library: the `vllm-deepthink` CLI (cli.py) and its commands.

Each command module is thin: `add_cli_args(parser)` + `main(args)` over a library
function. build.py (producers), importers.py (producers), eval.py over evaluation.py
and results.py over results_rows.py / results_report.py (tasks + scorers), bench/
(throughput), model.py (tools.gguf_models).
"""
