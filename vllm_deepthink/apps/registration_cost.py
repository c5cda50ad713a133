"""What registering many adapters costs the API server: start-up time, memory per
adapter, `/v1/models` and a registered-name lookup, in-process through AdapterRegistry
(no engine), for synthetic adapters of a tiny model.

    python -m vllm_deepthink.apps.registration_cost --out results/registration.json

For each count N: `engine_args` of the N adapters is timed (what `vllm serve` runs on
its flags), and a directory of N adapters is scanned as `--deepthink-adapter-dir`
does at start and registered (`register_at_start`) with an empty weights-check cache
(cold: every file read and hashed once) and again by a second registry (warm: the
process remembers each file by (path, size, mtime)); the Python memory the registry
keeps is measured with tracemalloc (the adapters' configs, no tensor), and the process
RSS growth is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig, ModelFingerprint
from vllm_deepthink.format.adapter import clear_checked_files

COUNTS = (16, 256, 1024, 4096)


def tiny_model(directory: Path) -> Path:
    """A random 2-layer Llama checkpoint (2 KV heads of 64) in `directory`."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def synthetic_adapters(model_dir: Path, directory: Path, count: int,
                       prefix_len: int) -> Path:
    """`count` Deep-Thinking adapters of random K/V for the model, `directory`/a00000...;
    existing ones are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = ModelFingerprint.from_checkpoint(model_dir)
    shape = (fingerprint.num_kv_heads, prefix_len, fingerprint.head_dim)
    generator = torch.Generator().manual_seed(0)
    for index in tqdm(range(count), desc="synthetic adapters", leave=False):
        out = directory / f"a{index:05d}"
        if (out / "deepthink_config.json").is_file():
            continue
        ids = torch.randint(4, fingerprint.vocab_size, (prefix_len,),
                            generator=generator).tolist()
        config = DeepThinkConfig(
            base_model_name_or_path=str(model_dir), fingerprint=fingerprint,
            prefix_len=prefix_len, dtype="float32", demos_text=f"synthetic {index}",
            demo_token_ids=ids, optimizer="momentum",
            optimizer_params={"step_size": 0.01, "beta": 0.9}, position_mode="published",
            iterations_run=1, selected_iteration=1, build_args={"synthetic": index})
        kv = [torch.randn(shape, generator=generator) for _ in range(fingerprint.num_layers)]
        DeepThinkAdapter(config=config, keys=kv, values=[k * 0.5 for k in kv]
                         ).save_pretrained(out)
    return directory


def _subset(store: Path, root: Path, count: int) -> Path:
    """A directory holding the first `count` adapters of `store` (symlinks)."""
    directory = root / f"dir-{count}"
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        link = directory / f"a{index:05d}"
        if not link.exists():
            link.symlink_to(store / f"a{index:05d}")
    return directory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _start(model_dir: Path, directory: Path):
    """What `vllm serve --deepthink-adapter-dir DIR` does at start: one scan of DIR,
    every adapter registered."""
    from vllm_deepthink.plugin.registry import AdapterRegistry
    from vllm_deepthink.plugin.resolvers import DirectoryResolver
    from vllm_deepthink.plugin.serving.flags import adapters_in_dir

    adapters = adapters_in_dir(directory)
    registry = AdapterRegistry(model_dir, resolvers=[DirectoryResolver(directory)],
                               dtype=torch.float32, resident_budget=4 << 30)
    registry.register_at_start(adapters)
    if registry.failed():
        raise RuntimeError(f"adapters refused: {registry.failed()}")
    return registry


def _engine_args_seconds(directory: Path) -> float:
    """`vllm_deepthink.engine_args` of every adapter in `directory` (what `vllm serve
    --deepthink-adapter-dir` runs while parsing its flags: each config read and checked
    against the resident budget)."""
    import vllm.config  # noqa: F401  imported before the clock starts
    from vllm_deepthink.plugin.api import engine_args
    from vllm_deepthink.plugin.serving.flags import adapters_in_dir

    start = time.perf_counter()
    engine_args(adapters_in_dir(directory))
    return time.perf_counter() - start


def _median_us(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def _cards(registry) -> list[Any]:
    """The /v1/models cards of the adapters, built as serving.models.model_cards does."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    return [ModelCard(id=info.name, root=f"{info.name}@sha256:{info.digest}",
                      parent=info.parent or "base", max_model_len=1024 - info.prefix_len,
                      permission=[ModelPermission()]) for info in registry.infos()]


def measure(model_dir: Path, store: Path, work: Path, count: int) -> dict[str, Any]:
    """The figures of one count (see the module docstring)."""
    directory = _subset(store, work, count)
    clear_checked_files()
    start = time.perf_counter()
    registry = _start(model_dir, directory)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    _start(model_dir, directory)
    warm = time.perf_counter() - start
    del registry
    flags = _engine_args_seconds(directory)

    clear_checked_files()
    rss_before = _rss_bytes()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    registry = _start(model_dir, directory)
    kept = sum(stat.size_diff for stat in
               tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_before

    names = registry.names()
    cards_us = _median_us(lambda: _cards(registry), 5)
    lookup_us = _median_us(lambda: registry.get(names[len(names) // 2]), 200)
    return {"adapters": count, "start_seconds_cold": round(cold, 3),
            "start_seconds_warm": round(warm, 3), "engine_args_seconds": round(flags, 3),
            "ms_per_adapter_cold": round(1e3 * cold / count, 3),
            "ms_per_adapter_warm": round(1e3 * warm / count, 3),
            "python_bytes_per_adapter": round(kept / count),
            "rss_growth_bytes_per_adapter": round(max(rss_growth, 0) / count),
            "v1_models_cards_us": round(cards_us, 1),
            "registered_lookup_us": round(lookup_us, 2)}


def measure_registration(work: Path, counts=COUNTS, prefix_len: int = 16) -> dict[str, Any]:
    """Every count's figures, with the conditions they were measured in."""
    model_dir = tiny_model(work / "tiny-llama")
    store = synthetic_adapters(model_dir, work / "store", max(counts), prefix_len)
    rows = [measure(model_dir, store, work, count) for count in tqdm(counts, desc="counts")]
    adapter_bytes = (store / "a00000" / "deepthink_model.safetensors").stat().st_size
    return {"what": "adapter registration in the API server process (AdapterRegistry, "
                    "no engine): one --deepthink-adapter-dir scan + register_at_start",
            "model": "random Llama, 2 layers, 2 KV heads x 64",
            "prefix_len": prefix_len, "weights_file_bytes": adapter_bytes,
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rows": rows}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="/tmp/deepthink-registration",
                        help="where the tiny model and the synthetic adapters are written")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--out", default="results/registration.json")


def main(args: argparse.Namespace) -> int:
    report = measure_registration(Path(args.work_dir), tuple(args.counts), args.prefix_len)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for row in report["rows"]:
        print(row)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m vllm_deepthink.apps.registration_cost")
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
