"""Issue 11: the HTTP surface of an adapter server as a tested contract.

One real `vllm serve` for the module (tiny Llama, fp32, CPU) serving two adapters (a1:
L=40; a2: L=150, one full CPU block of 128 plus a tail), a PEFT LoRA (lora1) and runtime
adapter loading. Every field a client controls is sent with valid, malformed and hostile
values, for the base model, an adapter and the LoRA, in batches (one test per group).
The contract, checked for every probe of a batch and once after it:

- no 5xx: neither the HTTP status nor an error object (also inside a 200 stream) has a
  5xx code, and no error has an empty message;
- the engine is alive: /health after every probe, a normal request after the batch (a
  dead engine is restarted, so the failure stays with the probe that caused it);
- the other tenants (base, a1, a2, lora1) get the same prompt logprobs as at start.

Probes whose answer the plugin defines (reserved fields, adapter errors) also check the
status and that the message names the field. Plus the cache-salt poisoning attack end to
end, beam search with adapters against HF, and the repetition-penalty deviation.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.references import (
    hf_beam_search,
    hf_greedy_with_repetition_penalty,
    hf_reference,
    max_abs_diff,
)
from tests.helpers.http_probe import (
    QUERY,
    TENANT_QUERY,
    LiveServer,
    Probe,
    echo_logprobs,
    greedy,
    send,
)
from tests.helpers.hostile_adapters import CASES as HOSTILE_CASES
from tests.helpers.hostile_adapters import make_hostile
from tests.helpers.openai_server import CHAT_TEMPLATE, VLLM_SCRIPT
from tests.helpers.tiny_models import load_tiny, make_tiny_lora

pytestmark = pytest.mark.engine

PREFIX_LENS = {"a1": 40, "a2": 150}
VICTIM_LEN = 150           # > one CPU block (128): its first block is shared through the cache
MAX_MODEL_LEN = 512
TOLERANCE = 1e-4           # parity with HF (fp32)
TENANT_TOLERANCE = 1e-6    # the same request on the same server, before and after
MODELS = ("BASE", "a1", "lora1")
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def art(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-http")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    adapters, paths = {}, {}
    for n, (name, length) in enumerate({**PREFIX_LENS, "victim": VICTIM_LEN}.items()):
        paths[name] = root / "adapters" / name
        adapters[name] = noisy_adapter(model, tokenizer, paths[name], length, seed=n + 1,
                                       offset=n % 6)
    store = root / "store"   # --deepthink-adapter-dir, empty at start (issue 32)
    store.mkdir()
    return dict(root=root, model_dir=tiny_llama_dir, model=model, tokenizer=tokenizer,
                adapters=adapters, paths=paths, store=store,
                hostile=make_hostile(paths["a1"], root / "hostile"),
                lora_dir=make_tiny_lora(tiny_llama_dir, root / "lora1"))


@pytest.fixture(scope="module")
def server(art):
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    template = art["root"] / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    args = ["--deepthink-adapter", *(f"{n}={art['paths'][n]}" for n in PREFIX_LENS),
            "--enable-lora", "--lora-modules", f"lora1={art['lora_dir']}",
            "--max-lora-rank", "8", "--max-loras", "2", "--chat-template", str(template),
            "--deepthink-adapter-dir", str(art["store"])]
    live = LiveServer(art["model_dir"], args, log_dir=art["root"], env={RUNTIME_ENV: "True"},
                      max_model_len=MAX_MODEL_LEN)
    live.base = str(art["model_dir"])
    live.start()
    live.tenants = {model: echo_logprobs(live.http, model, TENANT_QUERY)
                    for model in (live.base, "a1", "a2", "lora1")}
    try:
        yield live
    finally:
        live.stop()


# ------------------------------------------------------------------------------ vectors

@dataclass(frozen=True)
class Vector:
    """One probe. `body` is JSON ("BASE" as model is the served base model); `raw` bytes
    are sent as they are (NaN, 1e309, broken JSON). `status` (and `fragments` of the
    message) is the answer the plugin defines; None: only the contract is checked.
    `in_stream`: a stream may carry the refusal as the error event of a 200 (how vLLM
    reports errors raised once the stream has started)."""

    label: str
    body: Any = None
    path: str = "/v1/completions"
    raw: bytes | None = None
    stream: bool = False
    status: int | None = None
    fragments: tuple[str, ...] = ()
    in_stream: bool = False

    def send(self, server) -> Probe:
        body = self.body
        if isinstance(body, dict) and body.get("model") == "BASE":
            body = {**body, "model": server.base}
        raw = self.raw.replace(b"BASE", server.base.encode()) if self.raw else None
        return send(server.http, "POST", self.path, body, raw=raw, stream=self.stream)

    def refusal_problem(self, probe: Probe) -> str | None:
        """Why the answer is not the defined refusal (None: it is, or none is defined)."""
        if self.status is None:
            return None
        if self.in_stream and probe.status == 200:
            error = probe.error
            if error is None:
                return f"expected an error event, found: {probe.text[:300]}"
        elif probe.status != self.status:
            return f"expected {self.status}, found {probe.status}: {probe.text[:300]}"
        else:
            error = probe.error
        if error is None or error.get("code") != self.status or not error.get("message"):
            return f"expected an OpenAI error with code {self.status}, found {probe.text[:300]}"
        missing = [f for f in self.fragments if f.lower() not in error["message"].lower()]
        return f"message {error['message']!r} does not name {missing}" if missing else None


def cmpl(model: str, **fields) -> dict:
    return {"model": model, "prompt": QUERY, "max_tokens": 2, "temperature": 0.0, **fields}


def chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Review: a charming film"}],
            "max_tokens": 2, "temperature": 0.0, **fields}


PROMPTS = {
    "text": QUERY, "text-batch": [QUERY, "Review: dull"], "ids": [5, 6, 7],
    "ids-batch": [[5, 6], [7]], "empty-ids-in-batch": [[]], "empty-text-in-batch": [""],
    "negative-id": [-1], "id-out-of-vocab": [100000], "id-2**63": [2 ** 63],
    "float-id": [1.5], "null-in-list": [None], "null": None, "object": {"a": 1},
    "nul-char": "a\u0000b", "long-text": "word " * 600,
    "ids-over-len-with-prefix": [5 + i % 300 for i in range(480)],
    "many-prompts": [[5, 6, 7]] * 40,
}


def field_vectors(model: str) -> list[Vector]:
    """Every client field for one model: only the contract is checked."""
    vectors = [Vector(f"{model}/prompt={name}", cmpl(model, prompt=prompt))
               for name, prompt in PROMPTS.items()]
    vectors += [Vector(f"{model}/prompt_logprobs={v!r}", cmpl(model, prompt_logprobs=v))
                for v in (-1, 0, 1, 20, 21, 10 ** 9, "x", True)]
    vectors += [Vector(f"{model}/logprobs={v!r}+echo", cmpl(model, logprobs=v, echo=True))
                for v in (-1, 0, 5, 20, 21, 10 ** 9)]
    vectors += [Vector(f"{model}/n={v}", cmpl(model, n=v, temperature=1.0, seed=1))
                for v in (0, 2, 64, 10 ** 6, -1)]
    vectors += [Vector(f"{model}/beam {label}", cmpl(model, use_beam_search=True, **extra))
                for label, extra in {"n=2": {"n": 2}, "n=3+logprobs": {"n": 3, "logprobs": 1},
                                     "n=1": {"n": 1}, "n=40": {"n": 40}}.items()]
    # Not here: length_penalty=-1e9 with beam search is a ZeroDivisionError (500) in
    # stock vLLM (entrypoints/generate/beam_search/utils.py get_beam_search_score);
    # test_security_plain.py shows the plugin answers it exactly as stock vLLM.
    vectors.append(Vector(f"{model}/beam+stream",
                          cmpl(model, use_beam_search=True, n=2, stream=True), stream=True))
    vectors += [Vector(f"{model}/logit_bias={label}", cmpl(model, logit_bias=bias))
                for label, bias in {"ok": {"5": 100}, "oov": {"100000": 1},
                                    "negative": {"-1": 1}, "not-a-number": {"abc": 1},
                                    "huge": {"5": 1e30}}.items()]
    vectors += [Vector(f"{model}/max_tokens={v}", cmpl(model, max_tokens=v))
                for v in (0, -1, 10 ** 9)]
    vectors.append(Vector(f"{model}/echo+max_tokens=0",
                          cmpl(model, echo=True, max_tokens=0, logprobs=1)))
    vectors += [Vector(f"{model}/cache_salt={label}", cmpl(model, cache_salt=salt))
                for label, salt in {"plain": "tenant-salt", "empty": "", "129-chars": "x" * 129,
                                    "slash": "a/b", "number": 5, "list": ["x"],
                                    "other-case": "DeepThink:x", "prefix-no-colon": "deepthinkx"
                                    }.items()]
    vectors += [Vector(f"{model}/kv_transfer_params={label}",
                       cmpl(model, kv_transfer_params=params))
                for label, params in {
                    "empty": {}, "remote-prefill": {"do_remote_prefill": True},
                    "remote-decode": {"do_remote_decode": True},
                    "remote-prefill-full": {"do_remote_prefill": True, "remote_engine_id": "x",
                                            "remote_block_ids": [1, 2, 3],
                                            "remote_host": "127.0.0.1", "remote_port": 1},
                    "list": [1], "string": "x"}.items()]
    # kv_transfer_params through vllm_xargs as a non-object is a 500 in stock vLLM (the
    # output processor calls .get() on it); the plugin's frontend refuses it with a 400.
    vectors += [Vector(f"{model}/vllm_xargs={label}", cmpl(model, vllm_xargs=xargs))
                for label, xargs in {
                    "unrelated": {"foo": 1}, "kv-params-string": {"kv_transfer_params": "x"},
                    "kv-params-int": {"kv_transfer_params": 1},
                    "kv-params-list": {"kv_transfer_params": [1]},
                    "ec-params-string": {"ec_transfer_params": "x"},
                    "report-mode": {"kv_cache_report_mode": "full"},
                    "nested-list": {"foo": [[1]]}}.items()]
    vectors += [Vector(f"{model}/chat {label}", body, path="/v1/chat/completions")
                for label, body in {
                    "plain": chat(model), "n=2": chat(model, n=2, temperature=1.0, seed=1),
                    "logprobs": chat(model, logprobs=True, top_logprobs=5),
                    "echo+prompt_logprobs": chat(model, echo=True, prompt_logprobs=1),
                    "beam": chat(model, use_beam_search=True, n=2),
                    "continue-final": chat(model, messages=[
                        {"role": "user", "content": "Review: a charming film"},
                        {"role": "assistant", "content": "Sentiment:"}],
                        continue_final_message=True, add_generation_prompt=False),
                    "no-messages": chat(model, messages=[]),
                    "image-url": chat(model, messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]),
                    "image-embeds": chat(model, messages=[{"role": "user", "content": [
                        {"type": "image_embeds", "image_embeds": "AAAA"}]}]),
                    "bad-role": chat(model, messages=[{"role": "nobody", "content": "x"}]),
                    }.items()]
    vectors.append(Vector(f"{model}/chat stream", chat(model, stream=True),
                          path="/v1/chat/completions", stream=True))
    vectors += [
        Vector(f"{model}/responses", {"model": model, "input": "hi", "max_output_tokens": 2},
               path="/v1/responses"),
        Vector(f"{model}/tokenize", {"model": model, "prompt": QUERY}, path="/tokenize"),
        Vector(f"{model}/detokenize", {"model": model, "tokens": [5, 6]}, path="/detokenize"),
        Vector(f"{model}/embeddings", {"model": model, "input": "hi"}, path="/v1/embeddings"),
        Vector(f"{model}/stream", cmpl(model, stream=True, max_tokens=4), stream=True),
    ]
    return vectors


def reserved_vectors(model: str) -> list[Vector]:
    """Fields the plugin reserves: a 400 naming the field, before any streaming starts."""
    vectors = []
    for key, value in [("deepthink_adapter", "a1"), ("deepthink_adapter", "a2"),
                       ("deepthink_adapter", "nosuch"), ("deepthink_adapter", ""),
                       ("deepthink_adapter", 5), ("deepthink_adapter", ["a1"]),
                       ("deepthink_adapter", "../a1"), ("deepthink_scored_from", 3),
                       ("deepthink_scored_from", "x"), ("deepthink_future_key", 1)]:
        for stream in (False, True):
            vectors.append(Vector(
                f"{model}/vllm_xargs {key}={value!r}{' stream' if stream else ''}",
                cmpl(model, vllm_xargs={key: value}, stream=stream), stream=stream,
                status=400, fragments=(key,)))
    vectors.append(Vector(f"{model}/chat vllm_xargs deepthink_adapter",
                          chat(model, vllm_xargs={"deepthink_adapter": "a1"}),
                          path="/v1/chat/completions", status=400,
                          fragments=("deepthink_adapter",)))
    vectors.append(Vector(f"{model}/responses vllm_xargs deepthink_adapter",
                          {"model": model, "input": "hi", "max_output_tokens": 2,
                           "vllm_xargs": {"deepthink_adapter": "a1"}},
                          path="/v1/responses", status=400, fragments=("deepthink_adapter",)))
    for label, salt in {"namespace": "deepthink:", "adapter-like": "deepthink:a1:" + "0" * 64,
                        "short": "deepthink:x"}.items():
        for stream in (False, True):
            tag = " stream" if stream else ""
            vectors.append(Vector(f"{model}/cache_salt {label}{tag}",
                                  cmpl(model, cache_salt=salt, stream=stream), stream=stream,
                                  status=400, fragments=("cache_salt",)))
        vectors.append(Vector(f"{model}/chat cache_salt {label}", chat(model, cache_salt=salt),
                              path="/v1/chat/completions", status=400,
                              fragments=("cache_salt",)))
    for label, entry in {"path": {"name": "a1", "path": "/etc", "digest": "0" * 64,
                                  "prefix_len": 40},
                         "string": "x", "bad-len": {"prefix_len": "x"},
                         "huge-len": {"prefix_len": 2 ** 62}}.items():
        vectors.append(Vector(f"{model}/kv_transfer_params deepthink={label}",
                              cmpl(model, kv_transfer_params={"deepthink": entry}),
                              status=400, fragments=("kv_transfer_params",)))
        vectors.append(Vector(f"{model}/chat kv_transfer_params deepthink={label}",
                              chat(model, kv_transfer_params={"deepthink": entry}),
                              path="/v1/chat/completions", status=400,
                              fragments=("kv_transfer_params",)))
    return vectors


# deepthink_scored_from values that killed the engine core (int() in Scheduler.schedule:
# 1e309 OverflowError, NaN and "x" ValueError, [1] TypeError); the others were accepted.
SCORED_FROM_RAW = ["1e309", "NaN", '"x"', "[1]", '"10"', "1.5", "-1", "true", "3"]


def scored_from_vectors() -> list[Vector]:
    return [Vector(f"{model}/prompt_logprobs + deepthink_scored_from={value}",
                   raw=(f'{{"model": "{model}", "prompt": "hello there", "max_tokens": 2, '
                        f'"prompt_logprobs": 1, "vllm_xargs": {{"deepthink_scored_from": '
                        f'{value}}}}}').encode(),
                   status=400, fragments=("deepthink_scored_from",))
            for model in MODELS for value in SCORED_FROM_RAW]


def model_vectors() -> list[Vector]:
    vectors = [Vector(f"model={name!r}", cmpl(name), status=404, fragments=(name[:50],))
               for name in ("nosuch", "../a1", "a1/../a2", "a1 ", "A1", "a1\n", "x" * 10000)]
    vectors += [Vector(f"model={name!r}", cmpl(name)) for name in ("", None)]
    vectors += [Vector(f"model={name!r}", cmpl(name), status=400) for name in (123, ["a1"])]
    return vectors


def adapter_error_vectors(tokenizer) -> list[Vector]:
    """Requests for an adapter that cannot be served: 400 with the plugin's message."""
    over = [5 + i % 300 for i in range(480)]  # + L > max_model_len=512, alone it fits
    words = 1
    while len(tokenizer(f"user: {'word ' * words}\nassistant:")["input_ids"]) < 490:
        words += 1  # a chat prompt that fits alone, not after a1's 40 positions
    vectors = []
    for stream in (False, True):
        tag = " stream" if stream else ""
        vectors += [
            Vector(f"a1/empty token query{tag}", cmpl("a1", prompt=[[]], stream=stream),
                   stream=stream, status=400, fragments=("zero tokens",), in_stream=stream),
            Vector(f"a1/empty token query in a batch{tag}",
                   cmpl("a1", prompt=[[5, 6], []], stream=stream), stream=stream, status=400,
                   fragments=("zero tokens",), in_stream=stream),
            Vector(f"a1/prefix + query over max_model_len{tag}",
                   cmpl("a1", prompt=over, stream=stream), stream=stream, status=400,
                   fragments=("max_model_len",), in_stream=stream),
            Vector(f"a2/prefix + query over max_model_len{tag}",
                   cmpl("a2", prompt=over[:400], stream=stream), stream=stream, status=400,
                   fragments=("max_model_len",), in_stream=stream),
        ]
    vectors.append(Vector("a1/chat prefix + query over max_model_len",
                          chat("a1", messages=[{"role": "user", "content": "word " * words}]),
                          path="/v1/chat/completions", status=400, fragments=("max_model_len",)))
    return vectors


def malformed_vectors() -> list[Vector]:
    deep = b'{"model": "a1", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return [Vector("raw " + repr(raw[:40]), raw=raw) for raw in (
        b"{", b"null", b"[]", b'"x"', b'{"model": "a1", "prompt": "x", "max_tokens": 1e309}',
        b'{"model": "a1", "prompt": "x", "temperature": NaN}', deep,
        b'{"model": "a1", "prompt": "\\ud800", "max_tokens": 2}',
        b'{"model": "BASE", "prompt": "\\ud800", "max_tokens": 2}')]


def admin_vectors(art) -> list[Vector]:
    load, unload = "/v1/load_deepthink_adapter", "/v1/unload_deepthink_adapter"
    good = str(art["paths"]["a1"])
    return [
        Vector("load name=../x", {"adapter_name": "../x", "adapter_path": good}, load, status=400),
        Vector("load name=x*200", {"adapter_name": "x" * 200, "adapter_path": good}, load,
               status=400),
        Vector("load path=/etc", {"adapter_name": "x", "adapter_path": "/etc"}, load, status=400),
        Vector("load path=/proc/self", {"adapter_name": "x", "adapter_path": "/proc/self"},
               load, status=400),
        Vector("load path=lora dir", {"adapter_name": "x", "adapter_path": str(art["lora_dir"])},
               load, status=400),
        Vector("load path=model dir", {"adapter_name": "x",
                                       "adapter_path": str(art["model_dir"])}, load, status=400),
        Vector("load name=BASE", {"adapter_name": str(art["model_dir"]), "adapter_path": good},
               load, status=400),
        Vector("load name=lora1", {"adapter_name": "lora1", "adapter_path": good}, load,
               status=400),
        Vector("load name=a1 again", {"adapter_name": "a1", "adapter_path": good}, load,
               status=400),
        Vector("load no path", {"adapter_name": "x"}, load, status=400),
        Vector("load inplace=maybe", {"adapter_name": "x", "adapter_path": good,
                                      "load_inplace": "maybe"}, load, status=400),
        Vector("unload nosuch", {"adapter_name": "nosuch"}, unload, status=404),
        Vector("unload empty", {"adapter_name": ""}, unload, status=400),
        Vector("tokens-in generate (off by default)", {"token_ids": [5, 6], "sampling_params": {
            "max_tokens": 2, "extra_args": {"deepthink_scored_from": "x"}}},
               "/inference/v1/generate"),
    ]


def hostile_file_vectors(art) -> list[Vector]:
    """Issue 32: each hostile adapter (tests/helpers/hostile_adapters.py) loaded through
    the runtime endpoint, and named as a model of --deepthink-adapter-dir (twice: the
    refusal is remembered): a 400 whose message names the field."""
    vectors = []
    for case, (_, fragment) in HOSTILE_CASES.items():
        vectors.append(Vector(f"load {case}", {"adapter_name": f"h-{case}",
                                               "adapter_path": str(art["hostile"][case])},
                              "/v1/load_deepthink_adapter", status=400, fragments=(fragment,)))
        vectors += [Vector(f"adapter dir {case} ({attempt})", cmpl(case), status=400,
                           fragments=(fragment,)) for attempt in ("first", "again")]
    return vectors


# ------------------------------------------------------------------------- the contract

def tenant_problems(server) -> list[str]:
    problems = []
    for model, before in server.tenants.items():
        after = echo_logprobs(server.http, model, TENANT_QUERY)
        diff = max((abs(a - b) for a, b in zip(after[1:], before[1:])), default=0.0)
        if len(after) != len(before) or diff > TENANT_TOLERANCE:
            problems.append(f"tenant {model}: prompt logprobs moved by {diff:.2e}")
    return problems


def run_batch(server, vectors: list[Vector]) -> list[str]:
    """Send every probe; return the contract violations (and wrong refusals), each named
    after the probe that caused it."""
    problems = []
    for vector in vectors:
        try:
            probe = vector.send(server)
        except Exception as exc:  # the server closed the connection
            problems.append(f"{vector.label}: no answer ({type(exc).__name__}: {exc})")
            probe = None
        if probe is not None:
            problems += [f"{vector.label}: {p}" for p in probe.server_errors()]
            wrong = vector.refusal_problem(probe)
            if wrong:
                problems.append(f"{vector.label}: {wrong}")
        if not server.healthy():
            problems.append(f"{vector.label}: the engine died\n{server.restart()}")
    died = server.ensure_serving(server.base)
    if died is not None:
        problems.append(f"after the batch the engine stopped serving: {died}")
    else:
        problems += tenant_problems(server)
    return problems


def assert_contract(server, vectors: list[Vector]) -> None:
    problems = run_batch(server, vectors)
    assert not problems, f"{len(problems)} problems in {len(vectors)} probes:\n" + "\n".join(
        problems)


# --------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("model", MODELS)
def test_every_client_field_keeps_the_contract(server, model):
    """Valid, malformed and hostile values of every field: never a 5xx, never a dead
    engine, the other tenants' answers unchanged (item 3: no `500 {"message": ""}`)."""
    assert_contract(server, field_vectors(model))


@pytest.mark.parametrize("model", MODELS)
def test_reserved_fields_are_refused_before_streaming(server, model):
    """Items 1, 4, 5: over HTTP the adapter is chosen by `model` only; `deepthink_*`
    vllm_xargs keys, our kv_transfer_params entry and `deepthink:` salts are a 400."""
    assert_contract(server, reserved_vectors(model))


def test_scoring_positions_from_clients_cannot_kill_the_engine(server):
    """Item 1: the issue's vector killed the engine core of every server."""
    assert_contract(server, scored_from_vectors())


def test_adapter_errors_are_400_with_their_message(server, art):
    """Item 3: AdapterRequestError is vLLM's validation error (was 500, empty message)."""
    assert_contract(server, adapter_error_vectors(art["tokenizer"]))


def test_model_names_and_malformed_bodies(server):
    assert_contract(server, model_vectors() + malformed_vectors())


def test_admin_endpoints(server, art):
    assert_contract(server, admin_vectors(art))


def test_item32_hostile_adapter_files_are_400_naming_the_field(server, art):
    """Before the fix: float / bool ids loaded (200) and the first request naming the
    adapter hung the engine core; num_layers 10**9 exhausted the API server's memory;
    100k-deep JSON was a 500; "x" and a 5000-digit integer a 400 with a raw Python
    message. Now each is a 400 naming the field, and the server answers the next
    request (the contract checks health after each probe, a request and the tenants'
    logprobs after the batch). The adapters are dropped into --deepthink-adapter-dir
    once the server runs: at start they would stop it (test_startup_refuses_...)."""
    for case, path in art["hostile"].items():
        if not (art["store"] / case).exists():
            shutil.copytree(path, art["store"] / case)
    assert_contract(server, hostile_file_vectors(art))
    listed = send(server.http, "GET", "/v1/models").body["data"]
    assert not [m["id"] for m in listed if m["id"] in HOSTILE_CASES or
                m["id"].startswith("h-")]


def test_item32_usage_counts_the_query_whatever_the_cache_salt(server, art):
    """Documented decision (README, Security): usage.prompt_tokens counts the prompt the
    client sent, the query, as prompt_token_ids, echo and prompt logprobs show it; the
    adapter's L positions belong to the model, whose /v1/models card offers
    max_model_len - L. A client cache_salt only keeps the adapter's prefix-cache blocks
    apart (each new salt loads the L positions again): same answer, same usage."""
    ids = art["tokenizer"](QUERY, add_special_tokens=False)["input_ids"]
    bodies = []
    for salt in (None, "tenant-1", "9f3c2a-random"):
        probe = greedy(server.http, "a1", **({"cache_salt": salt} if salt else {}))
        assert probe.status == 200, probe.text
        bodies.append(probe.body)
    for body in bodies:
        choice = body["choices"][0]
        assert body["usage"]["prompt_tokens"] == len(ids) == len(choice["prompt_token_ids"])
        assert body["usage"]["total_tokens"] == len(ids) + body["usage"]["completion_tokens"]
        assert choice["token_ids"] == bodies[0]["choices"][0]["token_ids"]
    card = next(m for m in send(server.http, "GET", "/v1/models").body["data"]
                if m["id"] == "a1")
    assert card["max_model_len"] == MAX_MODEL_LEN - PREFIX_LENS["a1"]


def test_item4_adapter_is_chosen_by_model_only(server):
    """`vllm_xargs` cannot select an adapter behind `model` (routing, ACLs, billing), and a
    LoRA never mixes with an adapter's K/V."""
    for model in (server.base, "lora1"):
        probe = greedy(server.http, model, vllm_xargs={"deepthink_adapter": "a1"})
        assert probe.status == 400 and "deepthink_adapter" in probe.error["message"], probe.text
        assert probe.error["param"] == "vllm_xargs"
    response = greedy(server.http, "a1")  # the legitimate way still works and says so
    assert response.status == 200 and response.body["model"] == "a1"


def test_item3_an_unloaded_adapter_is_404(server, art):
    """A request for an adapter that was loaded and unloaded again: 404 in the OpenAI
    shape. (When the unload lands between model routing and the engine, the frontend's
    UnknownAdapterError is a 404 too: test_security_units.test_item3_unknown_adapter_is_404.)"""
    loaded = send(server.http, "POST", "/v1/load_deepthink_adapter",
                  {"adapter_name": "short-lived", "adapter_path": str(art["paths"]["a1"])})
    assert loaded.status == 200, loaded.text
    assert send(server.http, "POST", "/v1/unload_deepthink_adapter",
                {"adapter_name": "short-lived"}).status == 200
    probe = greedy(server.http, "short-lived")
    assert probe.status == 404 and "short-lived" in probe.error["message"], probe.text


def test_item5_cache_salt_poisoning_end_to_end(server, art):
    """A plain request that forges a fresh adapter's cache salt and placeholder ids (all
    published with the adapter) is refused, and the adapter's answer stays HF's (before
    the fix it computed ICL K/V into the adapter's cached block: logprobs moved)."""
    victim = "victim"
    loaded = send(server.http, "POST", "/v1/load_deepthink_adapter",
                  {"adapter_name": victim, "adapter_path": str(art["paths"][victim])})
    assert loaded.status == 200, loaded.text
    try:
        adapter = art["adapters"][victim]
        ids = art["tokenizer"](QUERY, add_special_tokens=False)["input_ids"]
        salt = f"deepthink:{victim}:{adapter.digest}"
        attack = send(server.http, "POST", "/v1/completions", {
            "model": server.base, "prompt": list(adapter.config.demo_token_ids) + ids,
            "max_tokens": 1, "temperature": 0.0, "cache_salt": salt})
        served = echo_logprobs(server.http, victim, QUERY)
        reference = hf_reference(art["model"], adapter, ids, num_greedy=1)
        diff = max_abs_diff(served[1:len(ids)], reference.prompt_logprobs)
        assert diff < TOLERANCE, (f"the adapter's answer moved by {diff:.2e} after a plain "
                                  f"request forged its cache salt (attack: {attack.status})")
        assert attack.status == 400 and attack.error["param"] == "cache_salt", attack.text
    finally:
        send(server.http, "POST", "/v1/unload_deepthink_adapter", {"adapter_name": victim})


@pytest.mark.parametrize("name", list(PREFIX_LENS))
def test_item7_beam_search_with_an_adapter_matches_hf(server, art, name):
    """Beam search re-submits prompt text + grown ids; every step must see the query
    without BOS (the adapter is the whole prefix)."""
    ids = art["tokenizer"](QUERY, add_special_tokens=False)["input_ids"]
    beam_width, max_tokens = 2, 4
    reference = hf_beam_search(art["model"], art["adapters"][name], ids, beam_width,
                               max_tokens)
    probe = greedy(server.http, name, max_tokens=max_tokens, use_beam_search=True,
                   n=beam_width, ignore_eos=True, logprobs=1)
    assert probe.status == 200, probe.text
    assert probe.body["model"] == name
    choices = probe.body["choices"]
    assert [c["token_ids"] for c in choices] == [tokens for tokens, _ in reference]
    for choice, (_, logprobs) in zip(choices, reference):
        served = choice["logprobs"]["token_logprobs"]
        assert max_abs_diff(served, logprobs) < TOLERANCE, (served, logprobs)


def test_item9_repetition_penalty_counts_the_adapters_placeholder_tokens(server, art):
    """Documented deviation (docs/serving.md, "Security"): repetition_penalty counts the adapter's
    placeholder (demonstration) token ids as prompt tokens, as ICL with the
    demonstrations in the prompt would; HF's generate(past_key_values=adapter) does not."""
    penalty, num_tokens = 2.0, 12
    cases = []  # (adapter, query, HF tokens counting the placeholders) that tell them apart
    for name in PREFIX_LENS:
        adapter = art["adapters"][name]
        for query in (QUERY, TENANT_QUERY, "The quick brown fox"):
            ids = art["tokenizer"](query, add_special_tokens=False)["input_ids"]
            counted = hf_greedy_with_repetition_penalty(
                art["model"], adapter, ids, num_tokens, penalty,
                list(adapter.config.demo_token_ids))
            query_only = hf_greedy_with_repetition_penalty(
                art["model"], adapter, ids, num_tokens, penalty, [])
            if counted != query_only:
                cases.append((name, query, counted))
    assert cases, "no query distinguishes counting the placeholders from not counting them"
    for name, query, counted in cases:
        probe = greedy(server.http, name, prompt=query, max_tokens=num_tokens,
                       repetition_penalty=penalty, ignore_eos=True)
        assert probe.status == 200, probe.text
        assert probe.body["choices"][0]["token_ids"] == counted, (name, query)
