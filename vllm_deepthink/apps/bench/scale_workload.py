"""Inputs of the scale benchmark (`bench --scale`): many synthetic adapters and a
Zipf-popular request stream over them.

- `write_synthetic_adapters`: `count` valid, distinct adapter directories of L positions
  for a model, written fast: one seeded random K/V set (method "past-kv"), saved once
  per adapter with its index in the config's provenance, so every adapter has its own
  config digest and hence its own weights digest (the serving side keys residency and
  prefix-cache salts by it). Resumable: finished adapters are kept.
- `adapter_dir_of`: a directory holding exactly the first N of them (hard links, no
  copies), for `vllm serve --deepthink-adapter-dir`.
- `scale_requests`: which adapter each request names (None: a plain request),
  deterministic in the seed: round(plain_share * n) plain requests at seeded positions,
  the others drawn from Zipf(s) over the adapters (adapter k with weight 1/(k+1)^s).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME

SYNTHETIC_SOURCE = "synthetic-scale-bench"


def adapter_label(index: int) -> str:
    """The served name (and subdirectory) of synthetic adapter `index`."""
    return f"a{index:05d}"


def zipf_weights(count: int, s: float) -> list[float]:
    """Probabilities of Zipf(s) over `count` items: item k has weight 1/(k+1)^s."""
    if count < 1:
        raise ValueError(f"`count` must be >= 1, found {count}")
    if s < 0:
        raise ValueError(f"`zipf_s` must be >= 0, found {s}")
    raw = [1.0 / (k + 1) ** s for k in range(count)]
    total = sum(raw)
    return [w / total for w in raw]


def scale_requests(num_adapters: int, num_requests: int, *, zipf_s: float,
                   plain_share: float, seed: int = 0, stream: str = "timed"
                   ) -> list[int | None]:
    """Per request, the index of the adapter it names, or None for a plain request.
    `stream` names independent streams of one seed (e.g. "warmup", "timed")."""
    if not 0.0 <= plain_share <= 1.0:
        raise ValueError(f"`plain_share` must be in [0, 1], found {plain_share}")
    if num_requests < 1:
        raise ValueError(f"`num_requests` must be >= 1, found {num_requests}")
    rng = random.Random(f"scale-{seed}-{num_adapters}-{stream}")
    plain = set(rng.sample(range(num_requests), round(plain_share * num_requests)))
    weights = zipf_weights(num_adapters, zipf_s)
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    picks = rng.choices(range(num_adapters), cum_weights=cumulative, k=num_requests)
    return [None if i in plain else picks[i] for i in range(num_requests)]


def _is_written(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def synthetic_adapter(model_dir: str | Path, source: str | Path, prefix_len: int,
                      seed: int = 0):
    """One `DeepThinkAdapter` of seeded random K/V (L = prefix_len) for the model,
    imported as raw past_key_values (the `import past-kv` path) from `source`, a
    safetensors file written here unless it exists."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from vllm_deepthink.format.hf_config import kv_geometry
    from vllm_deepthink.producers.past_kv import import_past_kv

    source = Path(source)
    if not source.is_file():
        model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        num_layers, num_kv_heads, head_dim = kv_geometry(model_config)
        generator = torch.Generator().manual_seed(seed)
        # per layer [num_kv_heads, L, head_dim]
        tensors = {f"layers.{i}.{kind}": torch.randn(num_kv_heads, prefix_len, head_dim,
                                                     generator=generator)
                   for i in range(num_layers) for kind in ("key", "value")}
        source.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(source), metadata={"source": SYNTHETIC_SOURCE,
                                                  "seed": str(seed)})
    return import_past_kv(source, model_dir, build_args={"synthetic": SYNTHETIC_SOURCE,
                                                         "prefix_len": prefix_len,
                                                         "seed": seed})


def write_synthetic_adapters(model_dir: str | Path, out_dir: str | Path, count: int,
                             prefix_len: int, seed: int = 0) -> list[Path]:
    """Adapters a00000.. a{count-1} under out_dir (those already written are kept);
    their paths in index order."""
    from tqdm.auto import tqdm

    from vllm_deepthink.format import DeepThinkAdapter

    out_dir = Path(out_dir)
    paths = [out_dir / adapter_label(i) for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not _is_written(p)]
    if missing:
        base = synthetic_adapter(model_dir, out_dir / "synthetic-kv.safetensors",
                                 prefix_len, seed)
        if base.config.prefix_len != prefix_len:
            raise ValueError(f"synthetic adapter has L={base.config.prefix_len}, "
                             f"expected {prefix_len}")
        for i in tqdm(missing, desc=f"synthetic adapters (L={prefix_len})"):
            config = dataclasses.replace(
                base.config, provenance={**base.config.provenance, "index": i})
            DeepThinkAdapter(config=config, keys=base.keys, values=base.values
                             ).save_pretrained(paths[i])
    return paths


def adapter_dir_of(paths: list[Path], out_dir: str | Path) -> Path:
    """A directory whose subdirectories are exactly `paths` (by name), their files hard
    links to the originals (or copies where links are impossible)."""
    import shutil

    out_dir = Path(out_dir)
    wanted = {p.name: p for p in paths}
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            if child.name not in wanted:
                shutil.rmtree(child)
    for name, source in wanted.items():
        target = out_dir / name
        if _is_written(target):
            continue
        target.mkdir(parents=True, exist_ok=True)
        for file_name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: it marks the adapter
            dest = target / file_name
            dest.unlink(missing_ok=True)
            try:
                os.link(source / file_name, dest)
            except OSError:
                shutil.copy2(source / file_name, dest)
    return out_dir
