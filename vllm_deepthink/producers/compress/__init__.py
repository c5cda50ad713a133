"""The compressor: any KV-prefix adapter of L positions -> an adapter of k < L positions.

- selection.py: query-aware selection of k positions per layer and KV head (no
  gradients), the sink always kept.
- positions.py: the kept keys rotated by -(L-k) with the model's own RoPE (exact
  query/key distances); learned absolute positions refused.
- batches.py: queries run after a per-layer K/V prefix (the forward every step shares).

HF transformers only; never imports vLLM. The output is an ordinary adapter of method
"compressed" whose config records the compression.
"""
