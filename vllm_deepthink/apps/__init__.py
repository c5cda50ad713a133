"""Applications over the library: the `vllm-deepthink` CLI (cli.py) and its commands.

Each command is a thin `add_cli_args(parser)` + `main(args)` over one library call:
build.py (producers.deepthink.from_task.build_from_task), importers.py (producers),
eval/ (run.evaluate_task), results/ (table.update_table), bench/ (run.run_benchmark),
model.py (tools.gguf_models). errors.py: the usage error every command raises;
processes.py: the `vllm serve` process and engine environment of bench and tests.
"""
