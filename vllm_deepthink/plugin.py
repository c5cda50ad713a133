"""vLLM general plugin entry point (`vllm.general_plugins: deepthink`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers), sometimes more than once: it only registers, and is re-entrant.
"""

from __future__ import annotations

import threading

SUPPORTED_VLLM = (">=0.32", "<0.33")

_lock = threading.Lock()


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside the range the patches in compat.py were tested on."""
    from packaging.version import Version

    found = Version(version)
    if not Version("0.32") <= Version(found.base_version) < Version("0.33"):
        raise RuntimeError(
            f"vllm-deepthink supports vllm{','.join(SUPPORTED_VLLM)}, found vllm {version}. "
            f"Install a vLLM in that range, upgrade vllm-deepthink, or skip this plugin "
            f"with VLLM_PLUGINS set to the plugins you want (without 'deepthink').")


def register() -> None:
    """Register the DeepThink KV connector and apply the compat patches."""
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_deepthink import compat, frontend

    with _lock:
        if frontend.CONNECTOR_NAME not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(
                frontend.CONNECTOR_NAME, frontend.CONNECTOR_MODULE, "DeepThinkConnector")
        compat.apply_all()
