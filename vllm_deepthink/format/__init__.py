"""The adapter format: the contract every producer writes and the vLLM plugin reads.

- `DeepThinkConfig` (config.py): the documented config dataclass (the method that
  produced the K/V and its provenance), file names, dtypes, format versions.
- `DeepThinkAdapter` (adapter.py): config + per-layer K/V, `save_pretrained` /
  `from_pretrained`, validation.
- `ModelFingerprint` (fingerprint.py): the base-model facts an adapter is bound to.
- `hf_config.py`: facts read off an HF config; `hf_cache.py`: K/V <-> transformers cache.
- `AdapterFormatError` (errors.py): every refusal, saying what was expected and how to fix it.

Imports neither vLLM nor any producer (builder, importers).
"""

from vllm_deepthink.format.adapter import DeepThinkAdapter
from vllm_deepthink.format.config import (
    COMPRESSED,
    CONFIG_NAME,
    DEEPTHINK,
    FORMAT_VERSION,
    METHODS,
    PLACEHOLDER_TOKEN_ID,
    WEIGHTS_NAME,
    DeepThinkConfig,
    check_fingerprint,
    dtype_name,
    load_config,
    torch_dtype,
)
from vllm_deepthink.format.errors import AdapterFormatError
from vllm_deepthink.format.fingerprint import ModelFingerprint

__all__ = [
    "COMPRESSED", "CONFIG_NAME", "DEEPTHINK", "FORMAT_VERSION", "METHODS", "PLACEHOLDER_TOKEN_ID",
    "WEIGHTS_NAME", "AdapterFormatError", "DeepThinkAdapter",
    "DeepThinkConfig", "ModelFingerprint", "check_fingerprint", "dtype_name", "load_config",
    "torch_dtype",
]
