"""`vllm serve --deepthink-adapter`: flags.py (CLI flags -> engine arguments),
models.py (adapters as OpenAI models, runtime load/unload), routes.py (the admin
HTTP routes)."""
