"""Public offline API: engine arguments and sampling parameters for adapters.

    llm = LLM(model=MODEL, **vllm_deepthink.engine_args(adapters={"sst2": PATH}))
    llm.generate(["Review: a charming film\\nSentiment:"],
                 vllm_deepthink.sampling_params(adapter="sst2", max_tokens=4))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_deepthink.format import load_config
from vllm_deepthink.format.adapter import resolve_adapter_dir
from vllm_deepthink.plugin import protocol
from vllm_deepthink.plugin.connector.resident import resident_budget_error
from vllm_deepthink.plugin.resolvers import DirectoryResolver


def engine_args(adapters: Mapping[str, str | Path] | None = None, *,
                adapter_dirs: Sequence[str | Path] | None = None,
                resident_gib: float | None = None,
                parents: Mapping[str, str] | None = None,
                pin: Sequence[str] | None = None,
                **engine_kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `EngineArgs` that serve Deep-Thinking adapters.

    Args:
        adapters: {name: adapter directory or hub id} served from the start.
        adapter_dirs: directories where an unknown adapter name NAME resolves to
            DIR/NAME at request time (validated, then served without a restart).
        resident_gib: worker memory for resident adapters (default 4 GiB), counting
            the transient peak of a read; the least recently used beyond it are read from
            disk again (in the background) when needed. An adapter whose read cannot fit
            it is refused here (ValueError).
        parents: {name: served model name} /v1/models reports as an adapter's parent
            (`vllm serve`; default: the first served name).
        pin: names of adapters in `adapters` to keep resident: every worker reads them
            at engine start and never evicts them; their bytes count against
            `resident_gib`, and the engine refuses to start (with the sizes) when they
            leave no room to read the largest other adapter (docs/serving.md, Pinning).
        engine_kwargs: passed through (prefix caching is turned on unless given).

    Adds the DeepThink KV connector with this configuration. Pipeline parallel and
    decode/prefill context parallel are refused (ValueError); the connector refuses them
    again at engine start however the engine was configured. A `kv_transfer_config`
    given by the caller must be our connector's (its adapters are merged); another
    connector cannot share the KV connector slot. Adapters can also be added and removed
    on a running engine: `add_adapter(llm, name, path)`, `remove_adapter(llm, name)`.
    """
    from vllm.config import KVTransferConfig

    from vllm_deepthink.plugin.connector import pins

    protocol.check_parallelism(engine_kwargs)
    budget = protocol.resident_budget_bytes(resident_gib)  # a bad value fails here
    resolved = _resolve_adapters(adapters or {}, budget,
                                 engine_kwargs.get("tensor_parallel_size") or 1)
    plugin_config = {protocol.EXTRA_CONFIG_ADAPTERS: resolved}
    if adapter_dirs:
        plugin_config[protocol.EXTRA_CONFIG_ADAPTER_DIRS] = [
            str(DirectoryResolver(d).root) for d in adapter_dirs]
    if resident_gib is not None:
        plugin_config[protocol.EXTRA_CONFIG_RESIDENT_GIB] = float(resident_gib)
    if parents:
        plugin_config[protocol.EXTRA_CONFIG_PARENTS] = dict(parents)
    if pin is not None:
        plugin_config[protocol.EXTRA_CONFIG_PINNED] = _checked_pins(pin)
    user_config = engine_kwargs.pop("kv_transfer_config", None)
    if user_config is None:
        kv_config = KVTransferConfig(
            kv_connector=protocol.CONNECTOR_NAME,
            kv_connector_module_path=protocol.CONNECTOR_MODULE,
            kv_role="kv_consumer",
            kv_load_failure_policy="fail",
            kv_connector_extra_config=plugin_config)
    else:
        kv_config = _merge_kv_config(user_config, plugin_config)
    pins.pinned_paths(kv_config.kv_connector_extra_config)  # pins name served adapters
    engine_kwargs["kv_transfer_config"] = kv_config
    engine_kwargs.setdefault("enable_prefix_caching", True)
    return engine_kwargs


def add_adapter(llm, name: str, path: str | Path) -> None:
    """Serve the adapter at `path` (a directory or hub id) as `name` on a running
    `vllm.LLM` built with engine_args(...); replaces an adapter of that name (new
    requests use the new weights; their digest salts the prefix cache). A pinned adapter
    cannot be replaced (ValueError)."""
    _refuse_pinned(llm, name)
    registry(llm).register(name, path)


def remove_adapter(llm, name: str) -> None:
    """Stop serving adapter `name` on a running `vllm.LLM`; requests already running
    finish with it. A pinned adapter cannot be removed (ValueError)."""
    _refuse_pinned(llm, name)
    registry(llm).unregister(name)


def _refuse_pinned(llm, name: str) -> None:
    extra = llm.llm_engine.vllm_config.kv_transfer_config.kv_connector_extra_config
    if name in protocol.pinned_names(extra):
        raise ValueError(protocol.pinned_change_error(name))


def list_adapters(llm) -> list[str]:
    """Names of the adapters a running `vllm.LLM` serves."""
    return registry(llm).names()


def registry(llm):
    """The adapter registry of a `vllm.LLM` built with engine_args(...)."""
    from vllm_deepthink.plugin.registry import registry_for

    return registry_for(llm.llm_engine.vllm_config)


def sampling_params(adapter: str, **kwargs: Any):
    """A `vllm.SamplingParams` that serves the request with adapter `adapter`."""
    from vllm import SamplingParams

    protocol.check_adapter_name(adapter)
    extra_args = dict(kwargs.pop("extra_args", None) or {})
    extra_args[protocol.ADAPTER_ARG] = adapter
    return SamplingParams(extra_args=extra_args, **kwargs)


def _checked_pins(pin: Any) -> list[str]:
    """engine_args(pin=...): a list of adapter names, duplicates dropped."""
    if isinstance(pin, str) or not isinstance(pin, Sequence | set | frozenset):
        raise TypeError(f"pin must be a list of adapter names (e.g. pin=[\"sst2\"]), found "
                        f"{type(pin).__name__} {pin!r}")
    return list(dict.fromkeys(protocol.check_adapter_name(name) for name in pin))


def _resolve_adapters(adapters: Mapping[str, str | Path], budget: int | None = None,
                      tp_size: int = 1) -> dict[str, str]:
    """{name: local directory}; each config read once: a missing or malformed adapter,
    or (given `budget`) one whose read on a worker can never fit `budget` bytes, fails
    here (ValueError), not in a worker."""
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must map names to adapter directories, found {type(adapters).__name__}")
    resolved = {}
    for name, path in adapters.items():
        protocol.check_adapter_name(name)
        path = resolve_adapter_dir(path)  # a local directory or a hub id
        config = load_config(path)
        message = (None if budget is None
                   else resident_budget_error(name, config, budget, tp_size))
        if message is not None:
            raise ValueError(message)
        resolved[name] = str(path)
    return resolved


def _merge_kv_config(user_config: Any, plugin_config: dict[str, Any]):
    from vllm.config import KVTransferConfig

    if isinstance(user_config, dict):
        user_config = KVTransferConfig(**user_config)
    if not isinstance(user_config, KVTransferConfig):
        raise TypeError(
            f"kv_transfer_config must be a dict or KVTransferConfig, found "
            f"{type(user_config).__name__}")
    if user_config.kv_connector != protocol.CONNECTOR_NAME:
        raise ValueError(
            f"kv_transfer_config selects the {user_config.kv_connector!r} connector, but "
            f"Deep-Thinking adapters need the KV connector slot for "
            f"{protocol.CONNECTOR_NAME}; vLLM runs one connector per engine. Drop "
            f"kv_transfer_config, or pass one with kv_connector={protocol.CONNECTOR_NAME!r}.")
    if user_config.kv_load_failure_policy != "fail":
        raise ValueError(
            "kv_load_failure_policy must be 'fail' for Deep-Thinking adapters (a "
            "recomputed adapter load would compute the placeholder tokens instead)")
    extra = dict(user_config.kv_connector_extra_config)
    adapters = plugin_config.pop(protocol.EXTRA_CONFIG_ADAPTERS)
    merged = dict(extra.get(protocol.EXTRA_CONFIG_ADAPTERS) or {})
    for name, path in adapters.items():
        if name in merged and str(Path(merged[name]).resolve()) != path:
            raise ValueError(
                f"adapter {name!r} is given twice with different paths: {merged[name]} in "
                f"kv_transfer_config and {path} in adapters=")
        merged[name] = path
    extra[protocol.EXTRA_CONFIG_ADAPTERS] = _resolve_adapters(merged)
    if protocol.EXTRA_CONFIG_PINNED in plugin_config:
        plugin_config[protocol.EXTRA_CONFIG_PINNED] = list(dict.fromkeys(
            [*protocol.pinned_names(extra), *plugin_config[protocol.EXTRA_CONFIG_PINNED]]))
    extra.update(plugin_config)
    user_config.kv_connector_extra_config = extra
    if user_config.kv_connector_module_path is None:
        user_config.kv_connector_module_path = protocol.CONNECTOR_MODULE
    if user_config.kv_role is None:
        user_config.kv_role = "kv_consumer"
    return user_config


def connector_stats(llm) -> dict[str, Any]:
    """Adapter loads so far in `llm` (a `vllm.LLM` built with `disable_log_stats=False`).

    Returns {"adapter_loads": total, "adapter_tokens_loaded": total, "adapter_reads":
    total, "forward_path_load_steps": total, "pinned_adapters": n, "pinned_bytes": n,
    "by_adapter": {name: {"loads": n, "tokens": n, "reads": n}}, "plugin_cost": {part:
    {"microseconds", "requests", "steps", "us_per_request", "us_per_step"}}}, read from the
    connector's Prometheus metrics (plugin/connector/stats.py). forward_path_load_steps
    counts the steps during which a worker read an adapter on the forward path (expected
    0: reads run in the background); the pinned figures are gauges (one worker's bytes).
    plugin_cost is the time spent in the plugin's own code per part (frontend,
    scheduler, worker, worker_read, output; the workers' summed over ranks), per adapter
    request and per engine step it ran in (None where it counts none).
    """
    from vllm.v1.metrics.reader import Counter, Gauge

    from vllm_deepthink.plugin.connector.stats import (
        COST_REQUESTS_METRIC,
        COST_MICROSECONDS_METRIC,
        COST_STEPS_METRIC,
        FORWARD_PATH_METRIC,
        LOADS_METRIC,
        PINNED_BYTES_METRIC,
        PINNED_METRIC,
        READS_METRIC,
        TOKENS_METRIC,
    )

    fields = {LOADS_METRIC: "loads", TOKENS_METRIC: "tokens", READS_METRIC: "reads"}
    costs = {COST_MICROSECONDS_METRIC: "microseconds", COST_REQUESTS_METRIC: "requests",
             COST_STEPS_METRIC: "steps"}
    by_adapter: dict[str, dict[str, float]] = {}
    by_part: dict[str, dict[str, float]] = {}
    forward_path_steps = 0
    gauges = {PINNED_METRIC: 0, PINNED_BYTES_METRIC: 0}
    for metric in llm.get_metrics():
        if isinstance(metric, Gauge) and metric.name in gauges:
            gauges[metric.name] += metric.value
        if not isinstance(metric, Counter):
            continue
        if metric.name == FORWARD_PATH_METRIC:
            forward_path_steps += metric.value
        elif metric.name in fields:
            name = metric.labels.get("adapter", "?")
            entry = by_adapter.setdefault(name, {"loads": 0, "tokens": 0, "reads": 0})
            entry[fields[metric.name]] += metric.value
        elif metric.name in costs:
            part = by_part.setdefault(metric.labels.get("part", "?"),
                                      {"microseconds": 0, "requests": 0, "steps": 0})
            part[costs[metric.name]] += metric.value
    return {"adapter_loads": sum(e["loads"] for e in by_adapter.values()),
            "adapter_tokens_loaded": sum(e["tokens"] for e in by_adapter.values()),
            "adapter_reads": sum(e["reads"] for e in by_adapter.values()),
            "forward_path_load_steps": forward_path_steps,
            "pinned_adapters": gauges[PINNED_METRIC],
            "pinned_bytes": gauges[PINNED_BYTES_METRIC],
            "by_adapter": by_adapter, "plugin_cost": plugin_cost_rates(by_part)}


COST_FIELDS = ("microseconds", "requests", "steps")


def plugin_cost_rates(by_part: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{part: {"microseconds", "requests", "steps"}} (the plugin's cost counters) with
    "us_per_request" and "us_per_step" added (None where it counts none)."""
    out = {}
    for name, part in by_part.items():
        entry: dict[str, Any] = {key: part.get(key, 0) for key in COST_FIELDS}
        for count, key in (("requests", "us_per_request"), ("steps", "us_per_step")):
            entry[key] = entry["microseconds"] / entry[count] if entry[count] else None
        out[name] = entry
    return out


def plugin_cost_delta(before: dict[str, dict[str, float]],
                      after: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The plugin's cost per part of what ran between two snapshots of its counters
    (`connector_stats(llm)["plugin_cost"]`, or the same read from a server's /metrics)."""
    return plugin_cost_rates({
        name: {key: part.get(key, 0) - before.get(name, {}).get(key, 0) for key in COST_FIELDS}
        for name, part in after.items()})


def plugin_cost_per_request(cost: dict[str, dict[str, Any]], requests: int) -> float | None:
    """Microseconds of the plugin's code on the request path per request: every part but
    the background reads (worker_read, off the forward path), over `requests`."""
    if not requests:
        return None
    return sum(p["microseconds"] for name, p in cost.items() if name != "worker_read") / requests
