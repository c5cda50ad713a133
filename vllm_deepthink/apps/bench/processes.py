"""Each benchmarked offline system runs in its own process, with the same environment.

`run_system` runs one system (`python -m vllm_deepthink.apps.bench.systems SPEC OUT`)
with the environment it is given (`apps.processes.engine_env`, the same for every system).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def hf_threads(options) -> int:
    """Torch threads of HF work: `options.hf_threads`, else the OpenMP threads a vLLM
    worker gets (usable CPUs - reserved CPUs, at least 1)."""
    if options.hf_threads:
        return options.hf_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    reserved = 1 if options.reserved_cpus == "auto" else int(options.reserved_cpus)
    return max(1, cpus - reserved)


def run_system(system: str, spec: dict[str, Any], work_dir: Path, timeout: float,
               env: dict[str, str], reuse: bool = False) -> dict[str, Any]:
    """The system's result, or {"error": ...} with the log tail when its process fails.
    `system` names the files (a label such as deepthink-k16; the spec says what runs).
    With `reuse`, a result already in work_dir for exactly this spec is returned as is."""
    spec_path = work_dir / "specs" / f"{system}.json"
    out_path = work_dir / "results" / f"{system}.json"
    log_path = work_dir / "logs" / f"{system}.log"
    for p in (spec_path, out_path, log_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(spec)
    if (reuse and out_path.is_file() and spec_path.is_file()
            and spec_path.read_text() == text):
        result = json.loads(out_path.read_text())
        result.update(reused=True, omp_binding=omp_binding(log_path) if log_path.is_file() else [])
        return result
    out_path.unlink(missing_ok=True)
    spec_path.write_text(text)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_deepthink.apps.bench.systems", str(spec_path),
                 str(out_path)],
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
