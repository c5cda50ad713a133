"""Producers of KV-prefix adapters: they write the adapter format with HF transformers and
never import vLLM.

- deepthink/: the Deep-Thinking builder (iterative forward tuning) and its rotary helper.
- peft.py: PEFT prompt-learning adapters (prefix tuning, prompt tuning, P-tuning, ...)
  imported through PEFT's own code (the `peft` extra, imported only when used).
- past_kv.py: raw per-layer K/V (past_key_values) from a safetensors file.
- kv_import.py: what the importers share (checks against the base model, provenance).
"""
