"""Manifests of `build --manifest` for tests: lines of the shipped tasks (examples/data)
and one whose task directory does not exist."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import REPO_ROOT

DATA = REPO_ROOT / "examples" / "data"
SST2 = {"name": "sst2-s0", "task_dir": str(DATA / "sst2"), "seed": 0}
TREC = {"name": "trec-s1", "task_dir": str(DATA / "trec"), "seed": 1}
MISSING = {"name": "missing", "task_dir": str(DATA / "no-such-task"), "seed": 0}


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path
