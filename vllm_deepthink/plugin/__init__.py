"""The vLLM consumer of the adapter format: everything that runs inside vLLM.

`register()` is the `vllm.general_plugins: deepthink` entry point. vLLM calls it in
every process it starts (API server, engine core, workers), sometimes more than
once: it only registers (the KV connector and the patches), and is re-entrant.

- protocol.py: the keys frontend, scheduler and workers share;
- registry.py: the adapter registry of the frontend process;
- request_checks.py: the checks of every client value of the plugin;
- rewrite.py: an adapter request rewritten into a plain vLLM request;
- request_state.py: outputs of an adapter request show the query alone;
- connector/: the KV connector (scheduler side, worker side, resident adapters, stats);
- patches/: every patch of vLLM internals (engine, OpenAI server);
- serving/: `vllm serve --deepthink-adapter` (flags, OpenAI models, admin routes);
- api.py: the offline API (`engine_args`, `sampling_params`);
- scoring.py: choice scoring through a `vllm.LLM` (the plan of tasks/scoring.py).

Importing this package does not import vLLM; register() does.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = (">=0.32", "<0.33")

_lock = threading.Lock()


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside the range the patches were tested on."""
    from packaging.version import Version

    found = Version(version)
    if not Version("0.32") <= Version(found.base_version) < Version("0.33"):
        raise RuntimeError(
            f"vllm-deepthink supports vllm{','.join(SUPPORTED_VLLM)}, found vllm {version}. "
            f"Install a vLLM in that range, upgrade vllm-deepthink, or skip this plugin "
            f"with VLLM_PLUGINS set to the plugins you want (without 'deepthink').")


def register() -> None:
    """Register the DeepThink KV connector and apply the compat patches.

    On a vLLM outside SUPPORTED_VLLM it logs an error and registers nothing: vLLM loads
    the plugin in every process of the environment, and a plain server must keep working
    when vllm-deepthink does not support its vLLM (raising here would stop it)."""
    import vllm

    try:
        check_vllm_version(vllm.__version__)
    except RuntimeError as exc:
        logger.error("vllm-deepthink is inactive: %s", exc)
        return
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_deepthink.plugin import patches, protocol

    with _lock:
        if protocol.CONNECTOR_NAME not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(
                protocol.CONNECTOR_NAME, protocol.CONNECTOR_MODULE, "DeepThinkConnector")
        patches.apply_all()
