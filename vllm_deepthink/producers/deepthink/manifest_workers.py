"""Where the builds of a manifest run (manifest.build_manifest): in this process, in
worker processes on this machine (`run_local`), or on Ray actors (`run_ray`). Every
worker is a `ManifestBuilder`: it opens its base model once and builds task after task
with it; a task's error is its result, never the worker's end. At most one task per
worker is in flight, so a worker that dies fails only the tasks it and its peers held
at that moment, and a new worker takes the rest.

A job is `ManifestEntry.job()` (picklable: name, line, build_from_task's keyword
arguments); `done(name, adapter or None, seconds, error or None)` runs in the calling
process for each, which saves the adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vllm_deepthink.format.hub import HubResolutionError
from vllm_deepthink.producers.compress.compress import CompressError
from vllm_deepthink.producers.compress.from_task import CompressSettings, build_compressed_from_task
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.from_task import build_from_task, load_base_model
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
from vllm_deepthink.tasks import TaskError

Done = Callable[[str, Any, float, "str | None"], None]


def _error(exc: Exception) -> str:
    """Our own input errors say what to do already; anything else also names its type."""
    if isinstance(exc, (BuildError, TaskError, HubResolutionError, CompressError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ManifestBuilder:
    """One worker: the base model of the current task kept open (one at a time), `threads`
    torch threads (None: leave them); `progress`: each build reports its plan, iterations
    and choice on stderr (build_from_task's `progress`)."""

    def __init__(self, threads: int | None = None, progress: bool = False):
        self.progress = progress
        if threads:
            import torch

            torch.set_num_threads(threads)
        self._key: tuple | None = None
        self._base = None

    def _open(self, model: str, revision: str | None, dtype: str):
        key = (model, revision, dtype)
        if key != self._key:
            self._base = self._key = None  # free the previous model before the next loads
            self._base = load_base_model(model, revision, dtype)
            self._key = key
        return self._base

    def build(self, job: dict[str, Any]) -> tuple[str, Any, float, str | None]:
        """(name, adapter, seconds, None), or (name, None, seconds, error)."""
        started = time.perf_counter()
        kwargs = dict(job["kwargs"])
        policy = kwargs.pop("policy", None)
        try:
            base = self._open(kwargs.pop("model"), kwargs.get("revision"),
                              kwargs.get("dtype", "float32"))
            policy = SelectionPolicy(**policy) if policy else None
            compress = kwargs.pop("compress", None)
            if compress is None:
                adapter = build_from_task(base, policy=policy, progress=self.progress,
                                          **kwargs)
            else:
                adapter = build_compressed_from_task(
                    base, compress=CompressSettings.from_dict(compress), policy=policy,
                    progress=self.progress, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a task's failure must not stop the others
            return job["name"], None, time.perf_counter() - started, _error(exc)
        return job["name"], adapter, time.perf_counter() - started, None


# --------------------------------------------------------------- this machine

_WORKER: ManifestBuilder | None = None


def _init_worker(threads: int | None) -> None:
    global _WORKER
    _WORKER = ManifestBuilder(threads)


def _build_in_worker(job: dict[str, Any]):
    return _WORKER.build(job)


def run_local(jobs: list[dict[str, Any]], done: Done, *, workers: int = 1,
              threads: int | None = None, log_builds: bool = False) -> None:
    """`jobs` in this process (`workers` 1; `log_builds`: each build reports its
    iterations, ManifestBuilder's `progress`) or in `workers` spawned processes."""
    if workers == 1:
        import torch

        before = torch.get_num_threads()
        try:
            worker = ManifestBuilder(threads, progress=log_builds)
            for job in jobs:
                done(*worker.build(job))
        finally:
            torch.set_num_threads(before)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def pool():
        # spawn: a fork of a process that already runs torch threads can deadlock
        return ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))

    queue, inflight = list(reversed(jobs)), {}
    executor = pool()
    try:
        while queue or inflight:
            while queue and len(inflight) < workers:
                job = queue.pop()
                inflight[executor.submit(_build_in_worker, job)] = (job, time.perf_counter())
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            broken = None
            for future in finished:
                job, started = inflight.pop(future)
                try:
                    done(*future.result())
                except BrokenProcessPool as exc:
                    broken = exc
                    done(job["name"], None, time.perf_counter() - started,
                         f"a worker process died while this task was in flight ({exc})")
                except Exception as exc:  # noqa: BLE001 - e.g. a result that did not pickle
                    done(job["name"], None, time.perf_counter() - started,
                         f"{type(exc).__name__}: {exc}")
            if broken is not None:
                for job, started in inflight.values():  # the broken pool fails them all
                    done(job["name"], None, time.perf_counter() - started,
                         f"a worker process died while this task was in flight ({broken})")
                inflight.clear()
                executor.shutdown(wait=False, cancel_futures=True)
                executor = pool()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------- a Ray cluster

def _ray_threads(ray, workers: int) -> int:
    """The cluster's CPUs shared among the actors, at most one node's worth."""
    total = ray.cluster_resources().get("CPU", 1)
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")),
                  default=total)
    return max(1, int(min(total // workers, largest)))


def run_ray(jobs: list[dict[str, Any]], done: Done, *, workers: int = 1,
            threads: int | None = None, address: str | None = None) -> int:
    """`jobs` on `workers` Ray actors, each reserving `threads` CPUs (default: the
    cluster's shared among them) and running that many torch threads; joins the Ray
    instance this process already joined, else `ray.init(address=address)` (None: a
    local instance, started and stopped here). Returns the threads per actor."""
    try:
        import ray
        from ray.exceptions import RayActorError, RayError
    except ImportError:
        raise BuildError("`ray` needs Ray: pip install 'vllm-deepthink[ray]' (or "
                         "leave out `ray` to build on this machine)") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    actors: list = []
    try:
        threads = threads or _ray_threads(ray, workers)
        actor_class = ray.remote(num_cpus=threads)(ManifestBuilder)
        actors = [actor_class.remote(threads) for _ in range(min(workers, len(jobs)))]
        queue, idle, inflight = list(reversed(jobs)), list(actors), {}
        while queue or inflight:
            while queue and idle:
                actor, job = idle.pop(), queue.pop()
                inflight[actor.build.remote(job)] = (actor, job, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                actor, job, started = inflight.pop(ref)
                try:
                    done(*ray.get(ref))
                except RayActorError as exc:  # the actor died: a new one takes its place
                    done(job["name"], None, time.perf_counter() - started,
                         f"the Ray actor died while building this task ({exc})")
                    actors.remove(actor)
                    actor = actor_class.remote(threads)
                    actors.append(actor)
                except RayError as exc:
                    done(job["name"], None, time.perf_counter() - started,
                         f"{type(exc).__name__}: {exc}")
                idle.append(actor)
        return threads
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
