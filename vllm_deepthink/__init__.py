"""vllm-deepthink: serve Deep-Thinking and other KV-prefix adapters from vLLM's paged KV cache.

Packages, each importing only those listed before it:

- format/     the adapter format, the contract everything meets (no vLLM, no producer);
- tasks/      task directories, templates and choice scoring with transformers;
- producers/  adapters from HF transformers: the Deep-Thinking builder and the importers
              of PEFT prompt-learning adapters and raw past_key_values (never vLLM);
- plugin/     the vLLM consumer: plugin registration, KV connector, patches, serving,
              offline API (never a producer);
- apps/       the `vllm-deepthink` CLI: build, import, eval, results, bench, model;
- tools/      environment tools that are not the product.

Importing this package imports neither vLLM nor transformers; `engine_args` and
`sampling_params` import vLLM when called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DeepThinkAdapter", "DeepThinkConfig", "add_adapter", "engine_args",
           "remove_adapter", "sampling_params", "__version__"]


def engine_args(adapters=None, *, adapter_dirs=None, resident_gib=None, parents=None,
                **engine_kwargs: Any) -> dict[str, Any]:
    from vllm_deepthink.plugin.api import engine_args as _engine_args

    return _engine_args(adapters, adapter_dirs=adapter_dirs, resident_gib=resident_gib,
                        parents=parents, **engine_kwargs)


engine_args.__doc__ = ("Keyword arguments for `vllm.LLM` that serve adapters "
                       "(adapters={name: path}, adapter_dirs, resident_gib, parents); see "
                       "vllm_deepthink.plugin.api.engine_args.")


def sampling_params(adapter: str, **kwargs: Any):
    from vllm_deepthink.plugin.api import sampling_params as _sampling_params

    return _sampling_params(adapter, **kwargs)


sampling_params.__doc__ = "See vllm_deepthink.plugin.api.sampling_params."


def add_adapter(llm, name: str, path) -> None:
    from vllm_deepthink.plugin.api import add_adapter as _add_adapter

    _add_adapter(llm, name, path)


add_adapter.__doc__ = "See vllm_deepthink.plugin.api.add_adapter."


def remove_adapter(llm, name: str) -> None:
    from vllm_deepthink.plugin.api import remove_adapter as _remove_adapter

    _remove_adapter(llm, name)


remove_adapter.__doc__ = "See vllm_deepthink.plugin.api.remove_adapter."


def __getattr__(name: str) -> Any:
    if name in ("DeepThinkAdapter", "DeepThinkConfig"):
        from vllm_deepthink import format as adapter_format

        return getattr(adapter_format, name)
    raise AttributeError(f"module 'vllm_deepthink' has no attribute {name!r}")
