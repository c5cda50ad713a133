"""Every monkeypatch of vLLM internals, one function per patch.

- engine.py: the engine's frontend, output processor, KV cache manager and CPU core
  reservation (`LLM` and `vllm serve` alike);
- openai_server.py: `vllm serve` (CLI flags, model routing, /v1/models, admin routes);
- base.py: PatchSpec, the original callable of a patched one, replace().

Each patch names the vLLM file it targets and records the signature it was written
against in a PatchSpec; tests/plugin/test_patches.py fails loudly when a vLLM
release changes one of them. Tested range: vllm >= 0.32, < 0.33. `apply_all()` is
idempotent: plugins load in every vLLM process, sometimes twice.
"""

from __future__ import annotations

from vllm_deepthink.plugin.patches.base import PatchSpec, is_patched, original, replace

__all__ = ["PatchSpec", "apply_all", "is_patched", "original", "patch_specs", "replace"]


def patch_specs() -> tuple[PatchSpec, ...]:
    """Every PatchSpec (imports the vLLM modules they target)."""
    from vllm_deepthink.plugin.patches import engine, openai_server

    return engine.patch_specs() + openai_server.patch_specs()


def apply_all() -> None:
    """Apply every patch (idempotent)."""
    from vllm_deepthink.plugin.patches import engine, openai_server

    engine.apply()
    openai_server.apply()
