"""Adapters built per hour by `vllm-deepthink build --manifest` on this machine, with
--workers 1 (its default threads: all cores; and --threads 1) and --workers 2: writes
results/manifest-rate.json (docs/building.md, "Building many adapters").

    PYTHONPATH=. .venv/bin/python results/manifest-rate.py [--model models/smollm2-135m]

Every run builds every line of examples/manifest.jsonl (SST-2 and TREC, seeds 0-3) into a
fresh directory with a small fast protocol (--select-on none --iterations 5: five
Deep-Thinking iterations, the last kept, no dev scoring), so nothing is skipped. The
machine's load (os.getloadavg, `uptime`) is recorded before and after each run: on a
shared machine the rate is only as good as the cores it got.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ["--select-on", "none", "--iterations", "5"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# (workers, --threads): the default threads, then one thread per process for both.
RUNS = ((1, None), (1, 1), (2, None))


def run(model: str, manifest: Path, workers: int, threads: int | None, scratch: Path) -> dict:
    key = f"workers-{workers}-threads-{threads or 'default'}"
    out, summary = scratch / key, scratch / f"{key}.json"
    before = uptime()
    subprocess.run([sys.executable, "-m", "vllm_deepthink.apps.cli", "build", "--manifest",
                    str(manifest), "--out-dir", str(out), "--model", model, *PROTOCOL,
                    "--workers", str(workers), *(["--threads", str(threads)] if threads else []),
                    "--no-progress", "--output-json", str(summary)], cwd=ROOT, check=True)
    data = json.loads(summary.read_text())
    seconds = sorted(r["seconds"] for r in data["results"] if r["status"] == "built")
    return {"workers": workers, "threads_per_worker": data["threads"],
            "counts": data["counts"], "wall_seconds": round(data["wall_seconds"], 1),
            "adapters_per_hour": round(data["adapters_per_hour"], 1),
            "median_seconds_per_build": round(seconds[len(seconds) // 2], 1),
            "loadavg_before": data["machine"]["at_start"]["loadavg"],
            "loadavg_after": data["machine"]["at_end"]["loadavg"],
            "uptime_before": before, "uptime_after": uptime()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--manifest", default="examples/manifest.jsonl")
    parser.add_argument("--out", default=str(ROOT / "results" / "manifest-rate.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = [run(args.model, ROOT / args.manifest, w, t, Path(scratch)) for w, t in RUNS]
    one, one_thread, two = (r["adapters_per_hour"] for r in runs)  # the order of RUNS
    Path(args.out).write_text(json.dumps({
        "what": "vllm-deepthink build --manifest: adapters built per hour of wall time "
                "(model loads included), every line built",
        "model": args.model, "manifest": args.manifest,
        "protocol": " ".join(PROTOCOL), "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
        "ratios": {"workers_2_vs_workers_1": round(two / one, 2),
                   "workers_2_vs_workers_1_threads_1": round(two / one_thread, 2),
                   "workers_1_threads_1_vs_default": round(one_thread / one, 2)},
    }, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
