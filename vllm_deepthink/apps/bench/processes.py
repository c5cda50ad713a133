"""Each benchmarked system runs in its own process, with the same environment.

`engine_env` is the environment of every system process and server; `run_system`
runs one offline system (`python -m vllm_deepthink.apps.bench.systems SPEC OUT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def engine_env(args) -> dict[str, str]:
    """Environment of every system process and server: the same for all systems."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib),
               TOKENIZERS_PARALLELISM="false")
    if args.reserved_cpus != "auto":
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(int(args.reserved_cpus))
    return env


def hf_threads(args) -> int:
    if args.hf_threads:
        return args.hf_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    reserved = 1 if args.reserved_cpus == "auto" else int(args.reserved_cpus)
    return max(1, cpus - reserved)


def run_system(system: str, group_key: str, spec: dict[str, Any], work_dir: Path,
                timeout: float, args) -> dict[str, Any]:
    spec_path = work_dir / "specs" / f"{group_key}-{system}.json"
    out_path = work_dir / "results" / f"{group_key}-{system}.json"
    log_path = work_dir / "logs" / f"{group_key}-{system}.log"
    for p in (spec_path, out_path, log_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = engine_env(args)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_deepthink.apps.bench.systems", str(spec_path), str(out_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        return {"error": f"{system} process exited with {code}; log {log_path}:\n" + "\n".join(tail)}
    result = json.loads(out_path.read_text())
    result["omp_binding"] = omp_binding(log_path)
    return result


def omp_binding(log_path: Path) -> list[str]:
    """vLLM's "OpenMP thread binding info" lines from an engine log (which CPUs the
    worker's threads use, which are reserved)."""
    lines = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "ompmultiprocessing.py" in line:
            lines.append(line.split("] ", 1)[-1].strip())
    return lines[:8]
