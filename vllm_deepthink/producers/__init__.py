"""Producers of KV-prefix adapters: they write the adapter format with HF transformers and
never import vLLM.

- deepthink/: the Deep-Thinking builder (iterative forward tuning) and its rotary helper.
"""
