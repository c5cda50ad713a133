"""A real Hugging Face hub-cache layout on disk, for offline tests of hub ids.

    <cache>/models--ORG--NAME/blobs/<sha256>            file contents
    <cache>/models--ORG--NAME/snapshots/<commit>/<file> -> ../../blobs/<sha256>
    <cache>/models--ORG--NAME/refs/<branch or tag>      <commit>

huggingface_hub resolves `ORG/NAME` (and `revision=`) from this layout with
HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<cache>, through its own code path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def publish(source: str | Path, cache: str | Path, repo_id: str,
            refs: tuple[str, ...] = ("main",)) -> str:
    """Put every file of `source` into the cache as one commit of `repo_id`, pointed to by
    `refs`; returns the commit hash."""
    source, cache = Path(source), Path(cache)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(
        b"".join(p.relative_to(source).as_posix().encode() + p.read_bytes() for p in files)
        + repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def offline_env(cache: str | Path) -> dict[str, str]:
    """Environment that resolves hub ids from `cache` only, never the network."""
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
