"""The DeepThink KV connector (`kv_connector_module_path` = its connector.py).

- connector.py: `DeepThinkConnector`, the thin KV-connector class over both sides;
- scheduler.py: which adapter positions each request loads (`AdapterLoad`), a hit or
  an asynchronous load;
- residency.py: the scheduler's plan of what every worker's resident store holds
  (budget, transient peak of a read, LRU evictions, pins);
- pins.py: pinned adapters (the pinned set checked against the budget at engine start,
  read by every worker then, reported to the scheduler through the handshake);
- worker.py: background reads, and writes through the backend's `do_kv_cache_update`;
- resident.py: the per-worker store of resident adapters (failed reads remembered);
- stats.py: adapter-load counters and pinned gauges in vLLM's KV-connector stats API;
- kv_layout.py: pure tensor functions (slot mapping, head sharding, dtype).

This package's __init__ imports nothing, so kv_layout imports without vLLM.
"""
