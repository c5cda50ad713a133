"""Pinned adapters: `--deepthink-pin NAME...`, `"pin": true` in the JSON form of
`--deepthink-adapter`, `engine_args(pin=[NAME, ...])`.

A pin is engine configuration (kv_connector_extra_config["pinned"]: names of adapters
served from start), never a client's to set:
- every worker checks the pinned set against its budget (residency.pin_set_error; the
  engine refuses to start otherwise), reads the pinned adapters at engine start
  (worker.py), and reports what it read (name -> weights digest, L) through vLLM's
  connector handshake (`PinnedSet`), the one worker-to-scheduler channel at start;
- the scheduler pins them in its residency plan (scheduler.py): RESIDENT for the
  engine's life, never evicted by the LRU, their bytes counted against the budget; every
  other read runs in what they leave.
Pinned adapters cannot be unloaded or replaced at runtime (protocol.pinned_change_error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata

from vllm_deepthink.format import load_config
from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector.residency import Footprint, pin_set_error
from vllm_deepthink.plugin.connector.scheduler import ModelShape


@dataclass
class PinnedSet(KVConnectorHandshakeMetadata):
    """What one worker read at engine start: {name: (weights digest, prefix_len)}."""

    adapters: dict[str, tuple[str, int]] = field(default_factory=dict)


def pinned_paths(extra_config: dict[str, Any]) -> dict[str, str]:
    """{name: path} of the pinned adapters of an engine's kv_connector_extra_config.
    Raises ValueError for a pinned name that is not an engine-start adapter."""
    adapters = extra_config.get(protocol.EXTRA_CONFIG_ADAPTERS) or {}
    names = protocol.pinned_names(extra_config)
    missing = [name for name in names if name not in adapters]
    if missing:
        raise ValueError(
            f"pinned adapters {missing} are not served from engine start; a pinned adapter "
            f"must be one of the engine-start adapters ({sorted(adapters)}): give it in "
            f"engine_args(adapters=...) / --deepthink-adapter / --deepthink-adapter-dir.")
    return {name: adapters[name] for name in names}


def footprints(vllm_config: Any, paths: dict[str, str]) -> dict[str, Footprint]:
    """{name: footprint on one worker of this engine} of adapters {name: path}."""
    if not paths:
        return {}
    shape = ModelShape.of(vllm_config)
    return {name: shape.footprint(load_config(path).prefix_len)
            for name, path in paths.items()}


def check_pin_set(vllm_config: Any) -> dict[str, str]:
    """{name: path} of the pinned adapters of an engine (empty without pins); raises
    ValueError when the budget cannot hold them (residency.pin_set_error)."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config
    pinned = pinned_paths(extra)
    if not pinned:
        return {}
    others = {name: path for name, path in
              (extra.get(protocol.EXTRA_CONFIG_ADAPTERS) or {}).items() if name not in pinned}
    budget = protocol.resident_budget_bytes(extra.get(protocol.EXTRA_CONFIG_RESIDENT_GIB))
    message = pin_set_error(footprints(vllm_config, pinned),
                            footprints(vllm_config, others), budget)
    if message is not None:
        raise ValueError(f"vllm-deepthink cannot start: {message}")
    return pinned


def agreed_pins(per_rank: dict[Any, Any]) -> dict[str, tuple[str, int]]:
    """The pinned set every worker reported through the handshake ({rank: PinnedSet});
    raises ValueError when ranks read different weights (files changed at start)."""
    sets = [meta.adapters for meta in per_rank.values() if isinstance(meta, PinnedSet)]
    if not sets:
        return {}
    if any(s != sets[0] for s in sets) or len(sets) != len(per_rank):
        raise ValueError(
            f"the workers read different pinned adapters at engine start ({sets}): the "
            f"adapter files changed while the engine started. Start it again.")
    return dict(sets[0])
