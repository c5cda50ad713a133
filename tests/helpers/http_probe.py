"""Raw HTTP probes of a real `vllm serve` (httpx), for the security contract tests.

`send` posts any body (also malformed JSON, wrong types, NaN) and returns a `Probe`
(status, parsed JSON, the events of a stream); `Probe.server_errors()` lists every sign
of a server-side failure. `LiveServer` is a `VllmServer` a probe may kill: `alive()`
says whether it still serves and `restart()` starts a fresh one, so one fatal probe
fails its own check and not every later one. `normalized` blanks ids and timestamps so
two servers' answers compare byte for byte.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.openai_server import VllmServer

QUERY = "Review: a charming film\nSentiment:"
TENANT_QUERY = "Question: who wrote Hamlet ?\nType:"


@dataclass
class Probe:
    """One HTTP exchange: status, parsed JSON (or None) and, for streams, the events."""

    status: int
    body: Any
    text: str
    events: list[Any] = field(default_factory=list)

    @property
    def error(self) -> dict | None:
        """The OpenAI error object of the answer (the first error event of a stream)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        for event in self.events:
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                return event["error"]
        return None

    def server_errors(self) -> list[str]:
        """Every sign of a server-side failure: a 5xx status, an error object with a 5xx
        code (also inside a 200 stream), an error without a message."""
        problems = []
        if self.status >= 500:
            problems.append(f"HTTP {self.status}: {self.text[:300]}")
        for item in [self.body, *self.events]:
            error = item.get("error") if isinstance(item, dict) else None
            if isinstance(error, dict):
                code = error.get("code")
                if isinstance(code, int) and code >= 500:
                    problems.append(f"error object with code {code}: {error}")
                if not error.get("message"):
                    problems.append(f"error without a message: {error}")
        return problems


def send(http, method: str, path: str, body: Any = None, raw: bytes | None = None,
         stream: bool = False, timeout: float = 180.0) -> Probe:
    """One request; a body is sent as JSON (NaN allowed), `raw` bytes as they are."""
    kwargs: dict[str, Any] = {"timeout": timeout}
    if raw is not None:
        kwargs["content"] = raw
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif body is not None:
        kwargs["content"] = json.dumps(body, allow_nan=True)
        kwargs["headers"] = {"Content-Type": "application/json"}
    if stream:
        with http.stream(method, path, **kwargs) as response:
            lines = list(response.iter_lines())
        events = []
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                try:
                    events.append(json.loads(line[6:]))
                except json.JSONDecodeError:
                    events.append({"unparsed": line})
        text = "\n".join(lines)
        body_json = None
        if response.status_code != 200:
            try:
                body_json = json.loads(text)
            except json.JSONDecodeError:
                pass
        return Probe(response.status_code, body_json, text, events)
    response = http.request(method, path, **kwargs)
    try:
        body_json = response.json()
    except ValueError:
        body_json = None
    return Probe(response.status_code, body_json, response.text)


def echo_logprobs(http, model: str, prompt: Any = QUERY, **extra) -> list[float | None]:
    """Prompt logprobs of `prompt` under `model` (echo, max_tokens=1, temperature 0)."""
    probe = send(http, "POST", "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
        "echo": True, "logprobs": 0, **extra})
    assert probe.status == 200, f"{model}: {probe.status} {probe.text[:500]}"
    return probe.body["choices"][0]["logprobs"]["token_logprobs"]


def greedy(http, model: str, prompt: Any = QUERY, max_tokens: int = 6, **extra) -> Probe:
    return send(http, "POST", "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "return_token_ids": True, **extra})


_IDS = re.compile(r'"(id|created|created_at|request_id|system_fingerprint)"\s*:\s*'
                  r'("[^"]*"|[0-9.]+|null)')


# Fields a stream spreads over its chunks; everything else keeps its last non-null value.
_STREAMED = {"text", "content", "reasoning_content", "token_ids", "tokens", "token_logprobs",
             "top_logprobs", "text_offset"}


def _merge(old: Any, new: Any, key: str | None = None) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v, k) for k, v in new.items()}}
    if key in _STREAMED and isinstance(old, (str, list)) and type(old) is type(new):
        return old + new
    return old if new is None else new


def merged_stream(events: list[Any]) -> list[Any]:
    """A stream's events with its chunks merged per choice index. vLLM puts the tokens a
    slow reader has not yet taken into one chunk, so where a stream splits depends on
    timing, not on the server; what it says does not. Events without choices (errors, a
    usage chunk) stay where they are."""
    merged: dict | None = None
    choices: dict[int, dict] = {}
    out: list[Any] = []
    for event in events:
        if not (isinstance(event, dict) and isinstance(event.get("choices"), list)):
            out.append(event)
            continue
        if merged is None:
            merged = {}
            out.append(merged)
        merged.update(_merge(merged, {k: v for k, v in event.items() if k != "choices"}))
        for choice in event["choices"]:
            index = choice.get("index", 0)
            choices[index] = _merge(choices.get(index, {}), choice)
    if merged is not None:
        merged["choices"] = [choices[i] for i in sorted(choices)]
    return out


def normalized(probe: Probe) -> str:
    """A response as text with ids and timestamps blanked, for byte comparisons (a
    stream's chunks merged, and whether it ended with [DONE])."""
    text = probe.text if not probe.events else "\n".join(
        [json.dumps(e, sort_keys=True) for e in merged_stream(probe.events)]
        + (["[DONE]"] if "data: [DONE]" in probe.text else []))
    text = _IDS.sub(lambda m: f'"{m.group(1)}":"*"', text)
    # Request ids also appear inside error messages and stream chunk ids.
    text = re.sub(r"(cmpl|chatcmpl|resp)-[0-9a-f]{8,}(-\d+)?", r"\1-*", text)
    return f"{probe.status} {text}"


class LiveServer:
    """A `vllm serve` (VllmServer) plus an httpx client, restartable after a fatal probe.

    `normal_request(http, model)` is the request that shows the server serves (default:
    a 2-token greedy completion); `on_start` hooks run after every (re)start."""

    def __init__(self, model_dir: str | Path, args: list[str], log_dir: Path,
                 env: dict[str, str] | None = None, max_model_len: int = 512):
        self.model_dir, self.args, self.log_dir = str(model_dir), list(args), Path(log_dir)
        self.env, self.max_model_len = dict(env or {}), max_model_len
        self.proc: VllmServer | None = None
        self.http = None
        self.starts = 0
        self.on_start: list = []
        self.normal_request = lambda http, model: greedy(http, model, max_tokens=2)

    def launch(self) -> LiveServer:
        """Start the process without waiting (several servers may start at once)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = VllmServer(self.model_dir, self.args,
                               log_path=self.log_dir / f"server-{self.starts}.log",
                               env=self.env, max_model_len=self.max_model_len)
        self.starts += 1
        self.proc.start()
        return self

    def wait(self) -> LiveServer:
        self.proc.wait_until_healthy()
        self.http = self._client()
        for hook in self.on_start:
            hook(self)
        return self

    def _client(self):
        import httpx

        # uvicorn closes a connection idle for 5 s; never reuse one that old.
        return httpx.Client(base_url=self.proc.base_url, timeout=180.0,
                            limits=httpx.Limits(keepalive_expiry=2.0))

    def start(self) -> LiveServer:
        return self.launch().wait()

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self) -> str:
        """Restart; returns the tail of the old server's log."""
        tail = self.proc.log_tail(3000) if self.proc is not None else ""
        self.stop()
        self.start()
        return tail

    def healthy(self) -> bool:
        """GET /health answers 200 (vLLM answers 503 once its engine core died)."""
        if self.proc is None or self.proc.process is None or self.proc.process.poll() is not None:
            return False
        for _ in range(2):
            try:
                return self.http.get("/health", timeout=30.0).status_code == 200
            except Exception:  # a 500 may have closed the kept-alive connection: retry
                self.http.close()
                self.http = self._client()
                time.sleep(1.0)
        return False

    def serving(self, model: str) -> str | None:
        """None when the server answers a normal request for `model`, else why not."""
        if not self.healthy():
            return "the server is not healthy (/health)"
        problem = None
        for _ in range(2):
            try:
                probe = self.normal_request(self.http, model)
                break
            except Exception as exc:  # a 500 may close the kept-alive connection: retry
                problem = f"{type(exc).__name__}: {exc}"
                self.http.close()
                self.http = self._client()
                time.sleep(1.0)
        else:
            return problem
        if probe.status != 200:
            return f"a normal request got {probe.status}: {probe.text[:300]}"
        return None

    def ensure_serving(self, model: str) -> str | None:
        """Restart the server if it does not serve `model`; why it did not (None: fine)."""
        problem = self.serving(model)
        if problem is None:
            return None
        return f"{problem}\n--- log tail ---\n{self.restart()}"
