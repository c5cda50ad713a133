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

and what the plugin's own code costs, per part (`COST_PARTS`), from
accumulators of `cost_clock_ns` that are always on (two clock reads per call):

    vllm:deepthink_plugin_microseconds_total{part=PART}  time spent in our code
    vllm:deepthink_plugin_requests_total{part=PART}      adapter requests it handled
    vllm:deepthink_plugin_steps_total{part=PART}         engine steps it ran in

(microseconds, not seconds: vLLM's metrics reader, behind `LLM.get_metrics()`, reads
counters as integers).

The scheduler side and the workers (summed over ranks, through the worker metadata)
report theirs with the load stats; the frontend's (`FRONTEND_COSTS`: the rewrite of
an adapter request, and the output side's query-only state and trimmed logprobs) is
added where the stats are observed, in the frontend process. Costs of steps without
adapter work ride along with the next stats that have some.

Two gauges hold the pinned adapters (pins.py), set when the metrics are built (the
engine has started, so every worker holds them) and constant for the engine's life:

    vllm:deepthink_pinned_adapters                            how many are pinned
    vllm:deepthink_pinned_bytes                               their bytes on each worker
"""

from __future__ import annotations

import time
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
COST_MICROSECONDS_METRIC = "vllm:deepthink_plugin_microseconds"
COST_REQUESTS_METRIC = "vllm:deepthink_plugin_requests"
COST_STEPS_METRIC = "vllm:deepthink_plugin_steps"
_FIELDS = ("loads", "tokens", "reads")  # per adapter
_STEPS = "forward_path_load_steps"       # a count
# Where the plugin's own time goes: the frontend's rewrite of a request, the scheduler
# side's connector calls, the workers' writes of a step (hits and finished reads), their
# background reads (off the forward path), the output side (query-only state, trimmed
# prompt logprobs).
COST_PARTS = ("frontend", "scheduler", "worker", "worker_read", "output")
_COSTS = ("cost_ns", "cost_requests", "cost_steps")  # per part


def cost_clock_ns() -> int:
    """The clock of the plugin's cost counters: the calling thread's CPU time. What our
    code costs is the CPU it takes; wall time would add the waits for the GIL (the API
    server's event loop shares it with vLLM's threads) and for a core (the engine keeps
    both busy here), which are other code's work."""
    return time.thread_time_ns()


class CostCounters:
    """Nanoseconds, requests and steps per part of the plugin's code: plain ints (one
    thread updates them; `take` hands them over and starts again)."""

    __slots__ = ("ns", "requests", "steps")

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.steps: dict[str, int] = {}

    def add(self, part: str, ns: int, requests: int = 0, steps: int = 0) -> None:
        self.ns[part] = self.ns.get(part, 0) + ns
        if requests:
            self.requests[part] = self.requests.get(part, 0) + requests
        if steps:
            self.steps[part] = self.steps.get(part, 0) + steps

    def since(self, part: str, start_ns: int, requests: int = 0, steps: int = 0) -> None:
        """add the time since `start_ns` (a cost_clock_ns() of this thread)."""
        self.add(part, cost_clock_ns() - start_ns, requests, steps)

    def take(self) -> dict[str, dict[str, int]]:
        """{"cost_ns": {part: ns}, "cost_requests": ..., "cost_steps": ...} so far, and
        start again from zero."""
        taken = {"cost_ns": self.ns, "cost_requests": self.requests,
                 "cost_steps": self.steps}
        self.ns, self.requests, self.steps = {}, {}, {}
        return taken


# The frontend process's costs (the rewrite and the output side run on its one
# request-handling thread: the event loop of `vllm serve`, the caller's for `LLM`).
FRONTEND_COSTS = CostCounters()


@dataclass
class DeepThinkConnectorStats(KVConnectorStats):
    """data = {"loads": {adapter: count}, "tokens": {adapter: positions},
    "reads": {adapter: count}, "forward_path_load_steps": count}."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for key in (*_FIELDS, *_COSTS):
            self.data.setdefault(key, {})
        self.data.setdefault(_STEPS, 0)

    def reset(self) -> None:
        self.data = {key: {} for key in (*_FIELDS, *_COSTS)}
        self.data[_STEPS] = 0

    def record_costs(self, costs: dict[str, dict[str, int]]) -> None:
        """Add CostCounters.take()'s dict (or a worker's)."""
        for key in _COSTS:
            for part, amount in costs.get(key, {}).items():
                self._add(key, part, amount)

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
        for key in (*_FIELDS, *_COSTS):
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
        """No adapter work (costs of steps without any are kept for the next stats)."""
        return (not any(self.data[key] for key in _FIELDS) and not self.data[_STEPS]
                and not any(self.data["cost_requests"].values()))


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
        parts = [*labelnames, "part"]
        self._costs = {
            "cost_ns": self._counter_cls(
                name=COST_MICROSECONDS_METRIC, labelnames=parts,
                documentation="Microseconds spent in vllm-deepthink's own code, per part "
                              "(frontend, scheduler, worker, worker_read, output)."),
            "cost_requests": self._counter_cls(
                name=COST_REQUESTS_METRIC, labelnames=parts,
                documentation="Adapter requests each part of vllm-deepthink handled."),
            "cost_steps": self._counter_cls(
                name=COST_STEPS_METRIC, labelnames=parts,
                documentation="Engine steps each part of vllm-deepthink ran in."),
        }
        for labels in per_engine_labelvalues.values():  # shown at 0 from the start
            self._steps.labels(*labels)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, counter in self._counters.items():
            for adapter, amount in transfer_stats_data.get(key, {}).items():
                counter.labels(*labels, adapter).inc(amount)
        self._steps.labels(*labels).inc(transfer_stats_data.get(_STEPS, 0))
        # Observed in the frontend process: its own costs join the engine's.
        frontend = FRONTEND_COSTS.take()
        for key, counter in self._costs.items():
            for source in (transfer_stats_data.get(key, {}), frontend[key]):
                for part, amount in source.items():
                    counter.labels(*labels, part).inc(amount / 1e3 if key == "cost_ns"
                                                      else amount)
