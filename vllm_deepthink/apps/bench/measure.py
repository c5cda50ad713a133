"""Measurement helpers: peak RSS of a process tree, percentiles, medians and spread."""

from __future__ import annotations

import statistics
import threading
import time


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


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread (max - min) / median of repetitions."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "rel_spread": (max(values) - min(values)) / median if median else 0.0,
            "n": len(values)}


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
