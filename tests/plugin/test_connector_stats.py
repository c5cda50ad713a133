"""Adapter-load statistics: the stats container and its Prometheus export (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402

from vllm_deepthink.plugin.connector.connector import DeepThinkConnector  # noqa: E402
from vllm_deepthink.plugin.connector.stats import DeepThinkConnectorStats  # noqa: E402


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
    rebuilt.aggregate(other)
    assert rebuilt.data == {"loads": {"sst2": 2, "trec": 2}, "tokens": {"sst2": 58, "trec": 128}}
    assert rebuilt.reduce() == {"deepthink adapter loads": 4,
                                "deepthink adapter tokens loaded": 186}
    assert not rebuilt.is_empty()
    assert DeepThinkConnector.build_kv_connector_stats(None).is_empty()


def test_prometheus_counters_are_labelled_by_adapter():
    registry = CollectorRegistry()

    def counter(**kwargs):
        return Counter(registry=registry, **kwargs)

    metrics = DeepThinkConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=None), {Counter: counter, Gauge: Gauge, Histogram: Histogram},
        ["model_name", "engine"], {0: ["m", "0"]})
    stats = DeepThinkConnectorStats()
    stats.record_load("sst2", 45)
    stats.record_load("sst2", 45)
    metrics.observe(stats.to_dict(), engine_idx=0)
    value = registry.get_sample_value
    labels = {"model_name": "m", "engine": "0", "adapter": "sst2"}
    assert value("vllm:deepthink_adapter_loads_total", labels) == 2
    assert value("vllm:deepthink_adapter_tokens_loaded_total", labels) == 90
