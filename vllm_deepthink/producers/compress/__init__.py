"""The compressor: any KV-prefix adapter of L positions -> an adapter of k < L positions.

- compress.py: `compress_adapter`, the one library call (selection, optional
  distillation, the record, label_calibration recomputed).
- selection.py: query-aware selection of k positions per layer and KV head (no
  gradients), the sink always kept.
- positions.py: the kept keys rotated by -(L-k) with the model's own RoPE (exact
  query/key distances); learned absolute positions refused.
- distill.py: gradients through the frozen model into the k positions' K/V.
- teachers.py: the distillation teachers (source, calibrated, ensemble of seeds) and
  their sparse targets.
- from_task.py: `CompressSettings`, `compress_for_task` (the queries of a task or given)
  and `build_compressed_from_task` (a Deep-Thinking build, then its compression).
- queries.py: the queries (a task's train rows, or a file) and their digest.
- batches.py: queries run after a per-layer K/V prefix (the forward every step shares).

HF transformers only; never imports vLLM. The output is an ordinary adapter of method
"compressed" whose config records the compression.
"""

from vllm_deepthink.producers.compress.compress import CompressError, compress_adapter
from vllm_deepthink.producers.compress.distill import DistillSettings
from vllm_deepthink.producers.compress.from_task import (CompressSettings,
                                                         build_compressed_from_task,
                                                         compress_for_task)

__all__ = ["CompressError", "CompressSettings", "DistillSettings", "build_compressed_from_task",
           "compress_adapter", "compress_for_task"]
