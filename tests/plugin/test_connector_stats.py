"""Adapter-load statistics: the stats container and its Prometheus export (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402

from vllm_deepthink.plugin.connector.connector import DeepThinkConnector  # noqa: E402
from vllm_deepthink.plugin.connector import stats as stats_module  # noqa: E402
from vllm_deepthink.plugin.connector.scheduler import DeepThinkWorkerMetadata  # noqa: E402
from vllm_deepthink.plugin.connector.stats import (CostCounters,  # noqa: E402
                                                   DeepThinkConnectorStats)


def test_stats_accumulate_per_adapter_and_survive_serialisation():
    stats = DeepThinkConnectorStats()
    assert stats.is_empty()
    stats.record_load("sst2", 45)
    stats.record_load("sst2", 13)
    stats.record_load("trec", 64)
    # Stats cross processes as their dict: rebuilt by the connector class.
    rebuilt = DeepThinkConnector.build_kv_connector_stats(stats.to_dict())
    other = DeepThinkConnectorStats()
    other.record_load("trec", 64)
    other.record_read("trec")
    other.record_forward_path_load_step()
    rebuilt.aggregate(other)
    assert rebuilt.data == {"loads": {"sst2": 2, "trec": 2}, "tokens": {"sst2": 58, "trec": 128},
                            "reads": {"trec": 1}, "forward_path_load_steps": 1,
                            "cost_ns": {}, "cost_requests": {}, "cost_steps": {}}
    assert rebuilt.reduce() == {"deepthink adapter loads": 4,
                                "deepthink adapter tokens loaded": 186,
                                "deepthink adapter reads": 1,
                                "deepthink forward-path load steps": 1}
    assert not rebuilt.is_empty()
    assert DeepThinkConnector.build_kv_connector_stats(None).is_empty()
    steps_only = DeepThinkConnectorStats()
    steps_only.record_forward_path_load_step()
    assert not steps_only.is_empty()


def test_prometheus_counters_are_labelled_by_adapter():
    registry = CollectorRegistry()

    def counter(**kwargs):
        return Counter(registry=registry, **kwargs)

    def gauge(**kwargs):
        return Gauge(registry=registry, **kwargs)

    metrics = DeepThinkConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None), {Counter: counter, Gauge: gauge, Histogram: Histogram},
        ["model_name", "engine"], {0: ["m", "0"]})
    stats = DeepThinkConnectorStats()
    value = registry.get_sample_value
    engine = {"model_name": "m", "engine": "0"}
    assert value("vllm:deepthink_forward_path_load_steps_total", engine) == 0  # from the start
    assert value("vllm:deepthink_pinned_adapters", engine) == 0     # no pin configured
    assert value("vllm:deepthink_pinned_bytes", engine) == 0
    stats.record_load("sst2", 45)
    stats.record_load("sst2", 45)
    stats.record_read("sst2")
    metrics.observe(stats.to_dict(), engine_idx=0)
    labels = {"model_name": "m", "engine": "0", "adapter": "sst2"}
    assert value("vllm:deepthink_adapter_reads_total", labels) == 1
    assert value("vllm:deepthink_forward_path_load_steps_total", engine) == 0
    assert value("vllm:deepthink_adapter_loads_total", labels) == 2
    assert value("vllm:deepthink_adapter_tokens_loaded_total", labels) == 90


def test_costs_add_up_across_ranks_and_steps_and_wait_for_adapter_work():
    worker = CostCounters()
    worker.add("worker", 3000, steps=1)
    worker.add("worker", 2000, requests=1, steps=1)
    rank0 = DeepThinkWorkerMetadata(costs=worker.take())
    assert worker.take() == {"cost_ns": {}, "cost_requests": {}, "cost_steps": {}}
    rank1 = DeepThinkWorkerMetadata(costs={"cost_ns": {"worker": 1000},
                                           "cost_steps": {"worker": 2}})
    both = rank0.aggregate(rank1)
    assert both.costs == {"cost_ns": {"worker": 6000}, "cost_requests": {"worker": 1},
                          "cost_steps": {"worker": 4}}
    stats = DeepThinkConnectorStats()
    stats.record_costs({"cost_ns": {"scheduler": 500}, "cost_steps": {"scheduler": 1}})
    assert stats.is_empty()  # steps without adapter work: kept for the next stats
    stats.record_costs(both.costs)
    assert not stats.is_empty()
    rebuilt = DeepThinkConnector.build_kv_connector_stats(stats.to_dict())
    assert rebuilt.data["cost_ns"] == {"scheduler": 500, "worker": 6000}


def test_prometheus_costs_join_the_frontends_own(monkeypatch):
    registry = CollectorRegistry()
    metrics = DeepThinkConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None),
        {Counter: lambda **kw: Counter(registry=registry, **kw),
         Gauge: lambda **kw: Gauge(registry=registry, **kw),
         Histogram: lambda **kw: Histogram(registry=registry, **kw)},
        ["model_name", "engine"], {0: ["m", "0"]})
    frontend = CostCounters()
    monkeypatch.setattr(stats_module, "FRONTEND_COSTS", frontend)
    frontend.add("frontend", 40_000, requests=2)
    stats = DeepThinkConnectorStats()
    stats.record_costs({"cost_ns": {"scheduler": 7_000}, "cost_requests": {"scheduler": 2},
                        "cost_steps": {"scheduler": 3}})
    metrics.observe(stats.to_dict(), engine_idx=0)
    metrics.observe(DeepThinkConnectorStats().to_dict(), engine_idx=0)  # counted once

    def value(metric, part):  # microseconds, requests, steps
        return registry.get_sample_value(f"vllm:deepthink_plugin_{metric}_total",
                                         {"model_name": "m", "engine": "0", "part": part})
    assert value("microseconds", "frontend") == pytest.approx(40)
    assert value("requests", "frontend") == 2
    assert value("microseconds", "scheduler") == pytest.approx(7)
    assert (value("requests", "scheduler"), value("steps", "scheduler")) == (2, 3)
