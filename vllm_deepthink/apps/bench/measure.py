"""Measurement helpers of the harness: peak RSS of a process tree, medians and spread, the
machine's load."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (vLLM's engine
    core runs in a child process) every `interval_s`; `.peak_bytes` is the maximum.
    Shared pages are counted once per process, so the figure is an upper bound."""

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_bytes = 0

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._process] + self._process.children(recursive=True):
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread (max - min) / median of repetitions."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "rel_spread": (max(values) - min(values)) / median if median else 0.0,
            "n": len(values)}


def uptime() -> str:
    """`uptime`'s line (the machine is shared: its load is part of the conditions)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
