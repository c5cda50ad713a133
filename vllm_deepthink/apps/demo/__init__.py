"""`vllm-deepthink demo`: build the demo adapters of `make serve` and print what they
score (cli.py over run.build_demo)."""
