"""`--server`: the same workloads against `vllm serve` over HTTP on 127.0.0.1.

For each vLLM system one server subprocess serves every workload (its own
session; always killed, process group included, when the measurement ends or
fails); per workload it is warmed up, its prefix cache emptied, then sent `--server-requests` streamed /v1/completions
requests at a fixed `--request-rate` (request i leaves at i / rate s). The timed
phase is bounded by `--server-duration` seconds: requests not sent by then are
not sent, requests still running are cancelled; both are counted.

Per system: TTFT p50/p99 (send -> first streamed token), latency p50/p99
(send -> last token), completed requests per second (completed / (last
completion - first send)), output tokens/s. Prompts are token-id lists; the
OpenAI `model` field is the adapter name for deepthink, "base" otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.bench.systems import VLLM_SYSTEMS, adapter_name, prompt_ids

_LAUNCH = ("import sys; from vllm_deepthink.tools.vllm_cpu_launcher import main; "
           "sys.argv = ['vllm'] + sys.argv[1:]; main()")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server mode")
    group.add_argument("--server", action="store_true",
                       help="also measure TTFT/latency against `vllm serve` over HTTP")
    group.add_argument("--request-rate", type=float, default=4.0,
                       help="server mode: requests per second (fixed interval)")
    group.add_argument("--server-requests", type=int, default=64,
                       help="server mode: timed requests per system and workload")
    group.add_argument("--server-duration", type=float, default=120.0,
                       help="server mode: bound in seconds of one timed phase")
    group.add_argument("--server-start-timeout", type=float, default=300.0,
                       help="server mode: seconds to wait for /health")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(system: str, model_dir: Path, port: int, max_model_len: int,
                   adapters: dict[str, str], block_size: int | None) -> list[str]:
    cmd = [sys.executable, "-c", _LAUNCH, "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
           "--max-model-len", str(max_model_len), "--served-model-name", "base",
           "--no-enable-prefix-caching" if system == "icl-no-apc" else "--enable-prefix-caching"]
    if block_size:
        cmd += ["--block-size", str(block_size)]
    if system == "deepthink":
        for name, path in adapters.items():
            cmd += ["--deepthink-adapter", f"{name}={path}"]
    return cmd


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except Exception:
        return 0


def _post(url: str, timeout: float = 30.0) -> int:
    try:
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except Exception:
        return 0


class Server:
    """A `vllm serve` subprocess; the context manager always kills its process group."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, port: int,
                 start_timeout: float):
        self.cmd, self.env, self.log_path, self.port = cmd, env, log_path, port
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self._tail()}")
            if _get(self.base_url + "/health") == 200:
                return self
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"vllm serve not healthy after {self.start_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self._tail()}")

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()


async def _one_request(session, url: str, body: dict[str, Any], send_at: float,
                       t0: float) -> dict[str, Any]:
    delay = t0 + send_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            text = await response.text()
            raise RuntimeError(f"HTTP {response.status} from {url}: {text[:300]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                if first is None:
                    first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
    done = time.perf_counter()
    return {"sent": sent - t0, "ttft_s": (first or done) - sent, "latency_s": done - sent,
            "done": done - t0, "output_tokens": tokens}


async def _timed_phase(base_url: str, bodies: list[dict[str, Any]], rate: float,
                       duration: float) -> dict[str, Any]:
    import aiohttp

    url = base_url + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        planned = [(i / rate, body) for i, body in enumerate(bodies) if i / rate < duration]
        tasks = [asyncio.ensure_future(_one_request(session, url, body, at, t0))
                 for at, body in planned]
        finished, pending = await asyncio.wait(tasks, timeout=duration)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    results, errors = [], []
    for task in finished:
        if task.exception() is not None:
            errors.append(repr(task.exception()))
        else:
            results.append(task.result())
    return {"results": results, "not_sent": len(bodies) - len(planned),
            "cancelled": len(pending), "errors": errors[:5], "num_errors": len(errors)}


def _figures(phase: dict[str, Any], rate: float) -> dict[str, Any]:
    from vllm_deepthink.apps.bench.measure import percentile

    results = phase["results"]
    figures: dict[str, Any] = {"request_rate": rate, "completed": len(results),
                               "not_sent": phase["not_sent"], "cancelled": phase["cancelled"],
                               "num_errors": phase["num_errors"], "errors": phase["errors"]}
    if results:
        span = max(r["done"] for r in results) - min(r["sent"] for r in results)
        ttft = [r["ttft_s"] for r in results]
        latency = [r["latency_s"] for r in results]
        figures.update(
            requests_per_s=len(results) / span if span > 0 else None,
            output_tokens_per_s=sum(r["output_tokens"] for r in results) / span if span > 0 else None,
            ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
            latency_p50_s=percentile(latency, 50), latency_p99_s=percentile(latency, 99))
    return figures


def _bodies(system: str, workload, request_set, count: int) -> list[dict[str, Any]]:
    bodies = []
    for i in range(min(count, len(request_set.queries))):
        task = request_set.task_of[i]
        model = adapter_name(workload.prefix_len, task) if system == "deepthink" else "base"
        bodies.append({"model": model,
                       "prompt": prompt_ids(system, request_set.demos, task,
                                            request_set.queries[i]),
                       "max_tokens": workload.output_len, "temperature": 0.0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    return bodies


def run_all(args, model_dir: Path, workloads, request_sets, warmups, adapter_dirs,
            work_dir: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from vllm_deepthink.apps.bench.report import run_entry
    from vllm_deepthink.apps.bench.processes import engine_env

    systems = [s for s in args.systems if s in VLLM_SYSTEMS]
    figures: dict[tuple[str, str], dict[str, Any]] = {}
    max_len = max(w.prefix_len + w.query_len + w.output_len for w in workloads)
    adapters = {adapter_name(w.prefix_len, t): str(adapter_dirs[(w.prefix_len, t)])
                for w in workloads for t in range(w.num_tasks)} if adapter_dirs else {}
    for system in tqdm(systems, desc="servers"):
        port = _free_port()
        env = dict(engine_env(args), VLLM_SERVER_DEV_MODE="1")
        cmd = server_command(system, model_dir, port, max_len, adapters, args.block_size)
        log = work_dir / "logs" / f"server-{system}.log"
        try:
            with Server(cmd, env, log, port, args.server_start_timeout) as server:
                for w in workloads:
                    warm = _bodies(system, w, warmups[w.key], args.warmup_requests)
                    asyncio.run(_timed_phase(server.base_url, warm, 1e6, args.server_duration))
                    _post(server.base_url + "/reset_prefix_cache")
                    bodies = _bodies(system, w, request_sets[w.key], args.server_requests)
                    phase = asyncio.run(_timed_phase(server.base_url, bodies,
                                                     args.request_rate, args.server_duration))
                    figures[(w.key, system)] = _figures(phase, args.request_rate)
        except Exception as exc:
            for w in workloads:
                figures.setdefault((w.key, system), {"error": str(exc)})
    runs = []
    for w in workloads:
        entry = run_entry(w, {s: figures[(w.key, s)] for s in systems}, {})
        runs.append(entry)
    return {"definitions": {
        "ttft_p50_s/ttft_p99_s": "send -> first streamed token, over completed requests",
        "latency_p50_s/latency_p99_s": "send -> end of stream",
        "requests_per_s": "completed / (last completion - first send) at the fixed request rate",
    }, "request_rate": args.request_rate, "requests": args.server_requests,
        "duration_bound_s": args.server_duration, "runs": runs}
