"""`vllm-deepthink compression`: the compression table (cli.py; specs.py: rows and
columns; run.py: one row; paired.py: its comparisons; report.py: compression.md and its
plot)."""
