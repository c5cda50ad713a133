"""Adapter-load statistics of the DeepThink connector, in vLLM's KV-connector stats API.

The scheduler-side connector counts, per adapter, the requests whose adapter
positions it sends to the workers (prefix-cache misses: a load) and the positions
written. vLLM collects them every step (`get_kv_connector_stats`), logs them with
its periodic stats and exports them as Prometheus counters (`/metrics` of
`vllm serve`, `LLM.get_metrics()` offline):

    vllm:deepthink_adapter_loads_total{adapter=NAME}          requests that loaded it
    vllm:deepthink_adapter_tokens_loaded_total{adapter=NAME}  adapter positions written
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

LOADS_METRIC = "vllm:deepthink_adapter_loads"
TOKENS_METRIC = "vllm:deepthink_adapter_tokens_loaded"
_FIELDS = ("loads", "tokens")


@dataclass
class DeepThinkConnectorStats(KVConnectorStats):
    """data = {"loads": {adapter: count}, "tokens": {adapter: positions}}."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for key in _FIELDS:
            self.data.setdefault(key, {})

    def reset(self) -> None:
        self.data = {key: {} for key in _FIELDS}

    def record_load(self, adapter: str, tokens: int) -> None:
        for key, amount in (("loads", 1), ("tokens", tokens)):
            self.data[key][adapter] = self.data[key].get(adapter, 0) + amount

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in _FIELDS:
            for adapter, amount in other.data.get(key, {}).items():
                self.data[key][adapter] = self.data[key].get(adapter, 0) + amount
        return self

    def reduce(self) -> dict[str, int | float]:
        return {"deepthink adapter loads": sum(self.data["loads"].values()),
                "deepthink adapter tokens loaded": sum(self.data["tokens"].values())}

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in _FIELDS)


class DeepThinkPromMetrics(KVConnectorPromMetrics):
    """Two counters labelled by engine and adapter name."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = [*labelnames, "adapter"]
        self._counters = {
            "loads": self._counter_cls(
                name=LOADS_METRIC, labelnames=names,
                documentation="Requests whose Deep-Thinking adapter K/V was written into "
                              "the KV cache (adapter prefix-cache misses)."),
            "tokens": self._counter_cls(
                name=TOKENS_METRIC, labelnames=names,
                documentation="Deep-Thinking adapter positions written into the KV cache."),
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, counter in self._counters.items():
            for adapter, amount in transfer_stats_data.get(key, {}).items():
                counter.labels(*labels, adapter).inc(amount)
