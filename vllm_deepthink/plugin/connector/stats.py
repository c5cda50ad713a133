"""Adapter-load statistics of the DeepThink connector, in vLLM's KV-connector stats API.

The scheduler-side connector counts, per adapter, the requests whose adapter
positions it sends to the workers (prefix-cache misses: a load), the positions
written and the reads from disk (resident-store misses, read in the background);
and the steps during which a worker read an adapter on the forward path (0 unless
something is wrong: a read makes every request of the step wait). vLLM collects them
every step (`get_kv_connector_stats`), logs them with its periodic stats and exports
them as Prometheus counters (`/metrics` of `vllm serve`, `LLM.get_metrics()` offline):

    vllm:deepthink_adapter_loads_total{adapter=NAME}          requests that loaded it
    vllm:deepthink_adapter_tokens_loaded_total{adapter=NAME}  adapter positions written
    vllm:deepthink_adapter_reads_total{adapter=NAME}          reads of it from disk
    vllm:deepthink_forward_path_load_steps_total              steps that waited on a read

and two gauges of the pinned adapters (pins.py), set when the metrics are built (the
engine has started, so every worker holds them) and constant for the engine's life:

    vllm:deepthink_pinned_adapters                            how many are pinned
    vllm:deepthink_pinned_bytes                               their bytes on each worker
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
READS_METRIC = "vllm:deepthink_adapter_reads"
FORWARD_PATH_METRIC = "vllm:deepthink_forward_path_load_steps"
PINNED_METRIC = "vllm:deepthink_pinned_adapters"
PINNED_BYTES_METRIC = "vllm:deepthink_pinned_bytes"
_FIELDS = ("loads", "tokens", "reads")  # per adapter
_STEPS = "forward_path_load_steps"       # a count


@dataclass
class DeepThinkConnectorStats(KVConnectorStats):
    """data = {"loads": {adapter: count}, "tokens": {adapter: positions},
    "reads": {adapter: count}, "forward_path_load_steps": count}."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for key in _FIELDS:
            self.data.setdefault(key, {})
        self.data.setdefault(_STEPS, 0)

    def reset(self) -> None:
        self.data = {key: {} for key in _FIELDS}
        self.data[_STEPS] = 0

    def _add(self, key: str, adapter: str, amount: int) -> None:
        self.data[key][adapter] = self.data[key].get(adapter, 0) + amount

    def record_load(self, adapter: str, tokens: int) -> None:
        self._add("loads", adapter, 1)
        self._add("tokens", adapter, tokens)

    def record_read(self, adapter: str) -> None:
        self._add("reads", adapter, 1)

    def record_forward_path_load_step(self) -> None:
        self.data[_STEPS] += 1

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in _FIELDS:
            for adapter, amount in other.data.get(key, {}).items():
                self._add(key, adapter, amount)
        self.data[_STEPS] += other.data.get(_STEPS, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {"deepthink adapter loads": sum(self.data["loads"].values()),
                "deepthink adapter tokens loaded": sum(self.data["tokens"].values()),
                "deepthink adapter reads": sum(self.data["reads"].values()),
                "deepthink forward-path load steps": self.data[_STEPS]}

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in _FIELDS) and not self.data[_STEPS]


class DeepThinkPromMetrics(KVConnectorPromMetrics):
    """Counters labelled by engine (and adapter name, for the per-adapter ones), and the
    pinned gauges (`pinned`: {name: resident bytes on one worker})."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]],
                 pinned: dict[str, int] | None = None):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        pinned = pinned or {}
        gauges = (
            (PINNED_METRIC, len(pinned), "Deep-Thinking adapters pinned resident "
                                         "(--deepthink-pin), never evicted."),
            (PINNED_BYTES_METRIC, sum(pinned.values()),
             "Bytes of worker memory the pinned Deep-Thinking adapters hold (each worker), "
             "counted against --deepthink-resident-gib."))
        for name, value, documentation in gauges:
            gauge = self._gauge_cls(name=name, labelnames=list(labelnames),
                                    documentation=documentation,
                                    multiprocess_mode="mostrecent")
            for labels in per_engine_labelvalues.values():
                gauge.labels(*labels).set(value)
        names = [*labelnames, "adapter"]
        self._counters = {
            "loads": self._counter_cls(
                name=LOADS_METRIC, labelnames=names,
                documentation="Requests whose Deep-Thinking adapter K/V was written into "
                              "the KV cache (adapter prefix-cache misses)."),
            "tokens": self._counter_cls(
                name=TOKENS_METRIC, labelnames=names,
                documentation="Deep-Thinking adapter positions written into the KV cache."),
            "reads": self._counter_cls(
                name=READS_METRIC, labelnames=names,
                documentation="Deep-Thinking adapters read from disk by the workers "
                              "(resident-store misses, read off the forward path)."),
        }
        self._steps = self._counter_cls(
            name=FORWARD_PATH_METRIC, labelnames=list(labelnames),
            documentation="Steps during which a worker read a Deep-Thinking adapter on "
                          "the forward path, making the whole batch wait (expected 0).")
        for labels in per_engine_labelvalues.values():  # shown at 0 from the start
            self._steps.labels(*labels)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, counter in self._counters.items():
            for adapter, amount in transfer_stats_data.get(key, {}).items():
                counter.labels(*labels, adapter).inc(amount)
        self._steps.labels(*labels).inc(transfer_stats_data.get(_STEPS, 0))
