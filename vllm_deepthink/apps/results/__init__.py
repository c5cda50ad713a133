"""`vllm-deepthink results`: the accuracy table (cli.py over table.update_table)."""
