"""Applications over the library: the `vllm-deepthink` CLI (cli.py) and its commands.

Each command module is thin: `add_cli_args(parser)` + `main(args)` over a library
function. build.py (producers), eval.py and results.py (tasks + scorers),
bench/ (throughput), model.py (tools.gguf_models).
"""
