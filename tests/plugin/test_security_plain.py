"""Issue 11, items 1 and 2: with the plugin installed, a `vllm serve` started without the
DeepThink connector behaves byte for byte like stock vLLM.

Each comparison runs two servers of the same model side by side: one with the plugin
(no --deepthink-adapter, runtime updating off) and one with plugins disabled
(`VLLM_PLUGINS=`, stock vLLM). Both get the same sequence of probes (normal requests,
the crash vectors of item 1, the fields the plugin reserves on its own servers, a stock
vLLM bug) and the answers are compared with ids and timestamps blanked. A normal request
follows every hostile probe, so a dead engine shows up as a difference too.

Also an attention-free model (a tiny BERT embedding model: its KV cache has no group),
whose first request killed the engine core in the KV-cache patch of before.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.http_probe import QUERY, LiveServer, normalized, send
from tests.helpers.openai_server import CHAT_TEMPLATE, VLLM_SCRIPT
from tests.helpers.tiny_models import make_tiny_bert, make_tiny_model

pytestmark = pytest.mark.engine

RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING"


def llama_probes(model: str) -> list[tuple[str, str, bytes]]:
    """(label, path, raw body) in the order they are sent."""

    def body(**fields) -> bytes:
        request = {"model": model, "prompt": QUERY, "max_tokens": 4, "temperature": 0.0,
                   "return_token_ids": True, **fields}
        return json.dumps(request).encode()

    def scored_from(value: str) -> bytes:
        return (f'{{"model": "{model}", "prompt": "hello there", "max_tokens": 2, '
                f'"prompt_logprobs": 1, "vllm_xargs": {{"deepthink_scored_from": {value}}}}}'
                ).encode()

    normal = ("normal", "/v1/completions", body(echo=True, logprobs=1))
    probes = [
        normal,
        ("prompt_logprobs", "/v1/completions", body(prompt_logprobs=2)),
        ("prompt_logprobs again (cached)", "/v1/completions", body(prompt_logprobs=2)),
        ("n=2 seeded", "/v1/completions", body(n=2, temperature=1.0, seed=7)),
        ("beam n=2", "/v1/completions", body(use_beam_search=True, n=2)),
        ("stream", "/v1/completions", body(stream=True)),
        ("chat", "/v1/chat/completions", json.dumps({
            "model": model, "messages": [{"role": "user", "content": "Review: a charming film"}],
            "max_tokens": 4, "temperature": 0.0}).encode()),
        ("models", "/v1/models", b""),
    ]
    hostile = [
        ('scored_from="x"', "/v1/completions", scored_from('"x"')),
        ("scored_from=1e309", "/v1/completions", scored_from("1e309")),
        ("scored_from=NaN", "/v1/completions", scored_from("NaN")),
        ("scored_from=[1]", "/v1/completions", scored_from("[1]")),
        ("scored_from=3", "/v1/completions", scored_from("3")),
        ("xargs deepthink_adapter", "/v1/completions",
         body(vllm_xargs={"deepthink_adapter": "a1"})),
        ("kv_transfer_params deepthink", "/v1/completions", body(
            prompt_logprobs=1, kv_transfer_params={"deepthink": {
                "name": "a1", "path": "/etc", "digest": "0" * 64, "prefix_len": 2}})),
        ("kv_transfer_params deepthink bad len", "/v1/completions", body(
            prompt_logprobs=1, kv_transfer_params={"deepthink": {"prefix_len": "x"}})),
        ("cache_salt deepthink:", "/v1/completions", body(cache_salt="deepthink:a1:" + "0" * 64)),
        # Stock vLLM bugs the plugin neither fixes nor worsens (both servers answer 500):
        # the output processor calls .get() on a non-object kv_transfer_params, and beam
        # search divides by len ** length_penalty (0.0 for -1e9).
        ("xargs kv_transfer_params string", "/v1/completions",
         body(vllm_xargs={"kv_transfer_params": "x"})),
        ("beam length_penalty=-1e9", "/v1/completions",
         body(use_beam_search=True, n=2, length_penalty=-1e9)),
        ("load route", "/v1/load_deepthink_adapter",
         json.dumps({"adapter_name": "x", "adapter_path": "/etc"}).encode()),
    ]
    for probe in hostile:
        probes += [probe, normal]
    return probes


def bert_probes(model: str) -> list[tuple[str, str, bytes]]:
    embed = ("embed", "/v1/embeddings", json.dumps({"model": model, "input": QUERY}).encode())
    return [embed,
            ("embed batch", "/v1/embeddings",
             json.dumps({"model": model, "input": [QUERY, "hello"]}).encode()),
            ("embed with scored_from", "/v1/embeddings", json.dumps({
                "model": model, "input": "hello",
                "vllm_xargs": {"deepthink_scored_from": "x"}}).encode()),
            embed]


def answers(server: LiveServer, probes) -> list[str]:
    """Normalized answers; a probe after which the server no longer serves gets
    " + the engine died" appended and the server is restarted."""
    result = []
    for _, path, raw in probes:
        method = "GET" if path == "/v1/models" else "POST"
        try:
            probe = send(server.http, method, path, raw=raw or None,
                         stream=b'"stream": true' in raw)
            answer = normalized(probe)
        except Exception as exc:  # the server went away
            answer = f"no answer: {type(exc).__name__}"
        if server.ensure_serving(server.model_dir) is not None:
            answer += " + the engine died"
        result.append(answer)
    return result


def assert_same_answers(probes, with_plugin: list[str], stock: list[str]) -> None:
    differences = [f"{label}:\n  plugin: {a[:400]}\n  stock:  {b[:400]}"
                   for (label, _, _), a, b in zip(probes, with_plugin, stock) if a != b]
    assert not differences, (f"{len(differences)} of {len(probes)} answers differ from "
                             f"stock vLLM:\n" + "\n".join(differences))


def embed_request(http, model):
    return send(http, "POST", "/v1/embeddings", {"model": model, "input": "hello"})


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{(model kind, "plugin" | "stock"): LiveServer}, the four started at once."""
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    root = tmp_path_factory.mktemp("sec-plain")
    llama = make_tiny_model("llama", root / "tiny-llama")
    bert = make_tiny_bert(root / "tiny-bert")
    template = root / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    started = {}
    try:
        for kind, model_dir, args in (("llama", llama, ["--chat-template", str(template)]),
                                      ("bert", bert, [])):
            for variant, env in (("plugin", {"VLLM_PLUGINS": None, RUNTIME_ENV: None}),
                                 ("stock", {"VLLM_PLUGINS": "", RUNTIME_ENV: None})):
                server = LiveServer(model_dir, args, log_dir=root / f"{kind}-{variant}",
                                    env=env)
                if kind == "bert":
                    server.normal_request = embed_request
                started[(kind, variant)] = server.launch()
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_plain_server_with_the_plugin_answers_like_stock_vllm(servers):
    probes = llama_probes(servers[("llama", "plugin")].model_dir)
    with_plugin = answers(servers[("llama", "plugin")], probes)
    stock = answers(servers[("llama", "stock")], probes)
    assert stock[0].startswith("200 "), stock[0][:300]
    assert_same_answers(probes, with_plugin, stock)


def test_attention_free_model_with_the_plugin_answers_like_stock_vllm(servers):
    probes = bert_probes(servers[("bert", "plugin")].model_dir)
    with_plugin = answers(servers[("bert", "plugin")], probes)
    stock = answers(servers[("bert", "stock")], probes)
    assert stock[0].startswith("200 "), stock[0][:300]
    assert_same_answers(probes, with_plugin, stock)
