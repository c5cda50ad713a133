"""vllm-deepthink: serve Deep-Thinking KV adapters from vLLM's paged KV cache.

Importing this package does not import vLLM; `engine_args` and
`sampling_params` import it when called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["engine_args", "sampling_params", "__version__"]


def engine_args(adapters=None, **engine_kwargs: Any) -> dict[str, Any]:
    from vllm_deepthink.api import engine_args as _engine_args

    return _engine_args(adapters, **engine_kwargs)


engine_args.__doc__ = "See vllm_deepthink.api.engine_args."


def sampling_params(adapter: str, **kwargs: Any):
    from vllm_deepthink.api import sampling_params as _sampling_params

    return _sampling_params(adapter, **kwargs)


sampling_params.__doc__ = "See vllm_deepthink.api.sampling_params."
