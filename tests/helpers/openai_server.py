"""A real `vllm serve` in a subprocess for the server tests (one per test module),
and an OpenAI client for it.

`VllmServer(model_dir, extra_args, env)` starts `.venv/bin/vllm serve` on 127.0.0.1
and a free port; `wait_until_healthy()` polls /health (bounded in time) and raises
with the log tail when the process dies; `stop()` ends the process group it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_SCRIPT = Path(sys.executable).parent / "vllm"

# One template for the tiny models (they ship none): "role: content" lines.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_env(**extra: str | None) -> dict[str, str]:
    """The environment of a test server: ours plus `extra` (a None value unsets)."""
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO",
               TOKENIZERS_PARALLELISM="false")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class VllmServer:
    def __init__(self, model_dir: str | Path, extra_args: list[str], log_path: str | Path,
                 env: dict[str, str] | None = None, max_model_len: int = 512):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [str(VLLM_SCRIPT), "serve", str(model_dir), "--host", "127.0.0.1",
                        "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
                        "--max-model-len", str(max_model_len), "--max-num-seqs", "32",
                        "--seed", "0", *extra_args]
        self.env = engine_env(**(env or {}))
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        self._log = open(self.log_path, "wb")
        # Own process group, so stop() reaches the engine-core child as well.
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        return self

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_for_exit(self, timeout: float = 300.0) -> int:
        """Return code of a server expected to refuse to start (kills it on timeout)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"vllm serve still running after {timeout:.0f}s:\n"
                               f"{self.log_tail()}") from None

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
        # The group may hold children that outlived the leader.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.process = None


def openai_client(server: VllmServer):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0,
                         timeout=180.0)
