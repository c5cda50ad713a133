"""Adapter management of `vllm serve`: the flags, runtime load/unload, bad adapters.

The flag parsing and the start-time checks run without a server; one real server per
module (VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING=True) serves the runtime tests, and two
short-lived `vllm serve` processes must refuse to start.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.references import hf_reference, max_abs_diff
from tests.helpers.tiny_models import load_tiny, make_tiny_model
from vllm_deepthink.plugin.serving import flags as serving
from vllm_deepthink.format import WEIGHTS_NAME, AdapterFormatError, DeepThinkAdapter

TOLERANCE = 1e-4
QUERY = "Question: who wrote Hamlet ?\nType:"
PREFIX_LEN = 130  # one full CPU block (128) that the prefix cache keeps, and a tail


# ------------------------------------------------------------------- flags (no server)

def parse(argv: list[str]) -> argparse.Namespace:
    return serving.add_cli_args(argparse.ArgumentParser(exit_on_error=False)).parse_args(argv)


def test_adapter_flag_takes_name_equals_path():
    args = parse(["--deepthink-adapter", "sst2=adapters_store/sst2",
                  "--deepthink-adapter", "trec=/abs/trec=1"])
    assert serving.adapters_from_args(args) == {"sst2": "adapters_store/sst2",
                                                "trec": "/abs/trec=1"}
    assert serving.adapters_from_args(parse([])) == {}


@pytest.mark.parametrize("spec,reason", [
    ("sst2", "expected NAME=PATH"),
    ("sst2=", "expected NAME=PATH"),
    ("../x=/a", "a name is never a path"),
    ("a/b=/a", "a name is never a path"),
    (".hidden=/a", "starting with a letter or digit"),
    ("=/a", "invalid Deep-Thinking adapter name ''"),
])
def test_bad_adapter_flags_are_refused(spec, reason):
    with pytest.raises(argparse.ArgumentError, match=reason):
        parse(["--deepthink-adapter", spec])


@pytest.mark.parametrize("name", ["sst2", "trec-smollm2", "a.b_c-1", "X" * 128])
def test_plain_names_are_accepted(name):
    assert serving.check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a..b", "a/b", "a\\b", "-a", "a b", "X" * 129,
                                  "sst2\n"])
def test_path_like_names_are_refused(name):
    with pytest.raises(serving.AdapterNameError, match="invalid Deep-Thinking adapter name"):
        serving.check_adapter_name(name)


def test_adapter_dir_names_adapters_by_subdirectory(tmp_path):
    for name in ("sst2", "trec"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "deepthink_config.json").write_text("{}")
    (tmp_path / "notes").mkdir()        # no config: not an adapter
    (tmp_path / "README.md").write_text("store")
    args = parse(["--deepthink-adapter-dir", str(tmp_path)])
    assert serving.adapters_from_args(args) == {"sst2": str(tmp_path / "sst2"),
                                                "trec": str(tmp_path / "trec")}
    twice = parse(["--deepthink-adapter-dir", str(tmp_path), "--deepthink-adapter", "sst2=/x"])
    with pytest.raises(serving.AdapterNameError, match="'sst2' is given twice"):
        serving.adapters_from_args(twice)


def test_adapter_dir_may_start_empty_but_must_exist(tmp_path):
    # Adapters dropped into it later are resolved at request time.
    assert serving.adapters_in_dir(tmp_path) == {}
    with pytest.raises(AdapterFormatError, match="no such directory"):
        serving.adapters_in_dir(tmp_path / "missing")


def test_adapter_flag_json_form_and_several_values(tmp_path):
    args = parse(["--deepthink-adapter", "a=/x", '{"name": "b", "path": "org/b"}',
                  "--deepthink-adapter", '{"name": "c", "path": "/z", "base_model_name": "m"}'])
    assert serving.adapters_from_args(args) == {"a": "/x", "b": "org/b", "c": "/z"}
    args.model, args.served_model_name = "m", None
    assert serving.parents_from_args(args) == {"c": "m"}
    args.model = "other"
    with pytest.raises(serving.AdapterNameError, match="base_model_name 'm' is not a served"):
        serving.parents_from_args(args)
    for bad, reason in (('{"name": "b"}', "expected {"), ('{"name": "b", "path": "/p", '
                        '"extra": 1}', "unknown keys"), ("{nope", "invalid JSON")):
        with pytest.raises(argparse.ArgumentError, match=reason):
            parse(["--deepthink-adapter", bad])


def test_adapter_names_must_not_shadow_served_models_or_loras():
    args = argparse.Namespace(model="models/base", served_model_name=None,
                              lora_modules=[SimpleNamespace(name="sql-lora", path="/l")])
    serving.check_names_are_free({"sst2": "/a"}, args)
    with pytest.raises(serving.AdapterNameError, match="name of a served model"):
        serving.check_names_are_free({"models/base": "/a"}, args)
    with pytest.raises(serving.AdapterNameError, match="name of a LoRA module"):
        serving.check_names_are_free({"sql-lora": "/a"}, args)
    args.served_model_name = ["base", "alias"]
    with pytest.raises(serving.AdapterNameError, match="'alias' is already the name"):
        serving.check_names_are_free({"alias": "/a"}, args)


# ------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def admin(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return SimpleNamespace(root=root, model_dir=tiny_llama_dir, model=model,
                           tokenizer=tokenizer)


def rewrite_weights(adapter_dir: Path, edit) -> Path:
    """Apply edit(adapter) and write its tensors without the save-time checks."""
    adapter = DeepThinkAdapter.from_pretrained(adapter_dir)
    edit(adapter)
    (adapter_dir / WEIGHTS_NAME).write_bytes(adapter.to_safetensors_bytes())
    return adapter_dir


def make_bad_adapter(admin, kind: str) -> Path:
    """An adapter directory broken in one way; see BAD_ADAPTERS for the expected reason."""
    out = admin.root / "bad" / kind
    if out.exists():
        return out
    if kind == "wrong-base":
        other, other_tok = load_tiny("llama", make_tiny_model("llama", admin.root / "other",
                                                              seed=1))
        noisy_adapter(other, other_tok, out, 24)
        return out
    noisy_adapter(admin.model, admin.tokenizer, out, 24)
    weights = out / WEIGHTS_NAME
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "nan":
        rewrite_weights(out, lambda a: a.keys[1].view(-1).__setitem__(5, float("nan")))
    elif kind == "wrong-shape":
        # As many bytes as the config implies (the size check passes), the wrong shape.
        rewrite_weights(out, lambda a: a.values.__setitem__(
            0, a.values[0].transpose(1, 2).contiguous()))
    elif kind == "lora":
        shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text("{}")
    return out


BAD_ADAPTERS = {
    "truncated": "the file is truncated",
    "nan": "contains NaN or Inf",
    "wrong-shape": "tensor layers.0.value has shape",
    "wrong-base": "embedding_sha256",
    "lora": "looks like a PEFT/LoRA adapter",
}


def test_start_check_names_every_bad_adapter(admin):
    good = noisy_adapter(admin.model, admin.tokenizer, admin.root / "good", 24)
    assert good.prefix_len == 24
    serving.check_adapters_at_start(str(admin.model_dir), {"good": str(admin.root / "good")})
    bad = {f"bad-{kind}": str(make_bad_adapter(admin, kind)) for kind in BAD_ADAPTERS}
    with pytest.raises(AdapterFormatError) as info:
        serving.check_adapters_at_start(str(admin.model_dir),
                                        {"good": str(admin.root / "good"), **bad})
    message = str(info.value)
    assert f"cannot serve {len(bad)} of {len(bad) + 1}" in message
    for kind, reason in BAD_ADAPTERS.items():
        line = next(line for line in message.splitlines() if f"bad-{kind} (" in line)
        assert reason in line, f"{kind}: {line}"
    assert "good (" not in message


def test_flags_become_the_connector_config(admin, monkeypatch):
    vllm = pytest.importorskip("vllm")
    from vllm_deepthink.plugin import protocol

    monkeypatch.delenv(serving.RUNTIME_UPDATING_ENV, raising=False)
    noisy_adapter(admin.model, admin.tokenizer, admin.root / "good", 24)
    args = parse(["--deepthink-adapter", f"good={admin.root / 'good'}"])
    engine_args = serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)), args)
    kv = engine_args.kv_transfer_config
    assert kv.kv_connector == protocol.CONNECTOR_NAME
    assert kv.kv_connector_extra_config[protocol.EXTRA_CONFIG_ADAPTERS] == {
        "good": str((admin.root / "good").resolve())}
    assert engine_args.enable_prefix_caching is True
    # No flag, no runtime updating: vLLM's engine args are left alone.
    plain = vllm.EngineArgs(model=str(admin.model_dir))
    assert serving.apply_adapter_args(plain, parse([])).kv_transfer_config is None
    # Runtime updating alone sets the connector up with no adapter.
    monkeypatch.setenv(serving.RUNTIME_UPDATING_ENV, "True")
    engine_args = serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)),
                                             parse([]))
    assert engine_args.kv_transfer_config.kv_connector_extra_config[
        protocol.EXTRA_CONFIG_ADAPTERS] == {}
    args.api_server_count = 2
    with pytest.raises(ValueError, match="api_server_count > 1"):
        serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)), args)


def test_pin_flags_become_the_connector_config(admin, monkeypatch):
    vllm = pytest.importorskip("vllm")
    from vllm_deepthink.plugin import protocol

    monkeypatch.delenv(serving.RUNTIME_UPDATING_ENV, raising=False)
    for name in ("good", "other"):
        noisy_adapter(admin.model, admin.tokenizer, admin.root / name, 24)
    args = parse(["--deepthink-adapter", f"good={admin.root / 'good'}",
                  json.dumps({"name": "other", "path": str(admin.root / "other"), "pin": True}),
                  "--deepthink-pin", "good"])
    engine_args = serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)), args)
    extra = engine_args.kv_transfer_config.kv_connector_extra_config
    assert extra[protocol.EXTRA_CONFIG_PINNED] == ["other", "good"]
    args = parse(["--deepthink-adapter", f"good={admin.root / 'good'}", "--deepthink-pin", "x"])
    with pytest.raises(ValueError, match="--deepthink-pin: no adapter named 'x'"):
        serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)), args)


def test_an_adapter_larger_than_the_resident_budget_stops_the_server(admin, monkeypatch):
    vllm = pytest.importorskip("vllm")
    monkeypatch.delenv(serving.RUNTIME_UPDATING_ENV, raising=False)
    noisy_adapter(admin.model, admin.tokenizer, admin.root / "good", 24)
    tiny_budget = str(1 / (1 << 30))  # one byte
    args = parse(["--deepthink-adapter", f"good={admin.root / 'good'}",
                  "--deepthink-resident-gib", tiny_budget])
    with pytest.raises(ValueError, match="adapter 'good' .*Raise --deepthink-resident-gib"):
        serving.apply_adapter_args(vllm.EngineArgs(model=str(admin.model_dir)), args)


def test_routes_exist_only_with_runtime_updating(monkeypatch):
    pytest.importorskip("vllm")
    from fastapi import FastAPI

    from vllm_deepthink.plugin.serving import routes as serving_routes

    def paths(env: str | None) -> set[str]:
        if env is None:
            monkeypatch.delenv(serving.RUNTIME_UPDATING_ENV, raising=False)
        else:
            monkeypatch.setenv(serving.RUNTIME_UPDATING_ENV, env)
        app = FastAPI()
        serving_routes.attach_router(app)
        return {route.path for route in app.routes}

    routes = {serving_routes.LOAD_PATH, serving_routes.UNLOAD_PATH}
    assert not routes & paths(None)
    assert not routes & paths("0")
    assert routes <= paths("True")
    assert routes <= paths("1")


# ---------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def server(admin):
    from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer

    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    httpx = pytest.importorskip("httpx")
    good = admin.root / "served-good"
    noisy_adapter(admin.model, admin.tokenizer, good, 24, seed=7)
    proc = VllmServer(admin.model_dir, ["--deepthink-adapter", f"good={good}",
                                       "--deepthink-pin", "good"],
                      log_path=admin.root / "server.log",
                      env={serving.RUNTIME_UPDATING_ENV: "True"})
    try:
        proc.start()
        proc.wait_until_healthy()
        with httpx.Client(base_url=proc.base_url, timeout=180.0) as client:
            yield SimpleNamespace(http=client, proc=proc, base=str(admin.model_dir))
    finally:
        proc.stop()


def load(server, name, path, **extra):
    return server.http.post("/v1/load_deepthink_adapter",
                            json={"adapter_name": name, "adapter_path": str(path), **extra})


def unload(server, name):
    return server.http.post("/v1/unload_deepthink_adapter", json={"adapter_name": name})


def complete(server, model, max_tokens=6, **extra):
    return server.http.post("/v1/completions", json={
        "model": model, "prompt": QUERY, "max_tokens": max_tokens, "temperature": 0.0,
        "return_token_ids": True, **extra})


def served_models(server) -> dict[str, dict]:
    response = server.http.get("/v1/models")
    assert response.status_code == 200
    return {card["id"]: card for card in response.json()["data"]}


def assert_openai_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] and error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


def assert_matches_hf(admin, response, adapter) -> None:
    assert response.status_code == 200, response.text
    ids = admin.tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    reference = hf_reference(admin.model, adapter, ids, num_greedy=6)
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]["token_logprobs"]
    assert logprobs[0] is None
    assert max_abs_diff(logprobs[1:len(ids)], reference.prompt_logprobs) < TOLERANCE
    assert choice["token_ids"] == reference.greedy_tokens


@pytest.mark.engine
def test_a_pinned_adapter_is_shown_kept_and_served(admin, server):
    cards = served_models(server)
    assert cards["good"]["pinned"] is True
    assert "pinned" not in cards[server.base]  # vLLM's own card is unchanged
    assert_openai_error(unload(server, "good"), 400, "'good' is pinned")
    assert_openai_error(load(server, "good", admin.root / "served-good", load_inplace=True),
                        400, "'good' is pinned")
    assert complete(server, "good").status_code == 200
    metrics = server.http.get("/metrics").text
    pinned = [line for line in metrics.splitlines()
              if line.startswith("vllm:deepthink_pinned_adapters{")]
    assert pinned and all(line.endswith(" 1.0") for line in pinned), pinned
    reads = [line for line in metrics.splitlines()
             if line.startswith("vllm:deepthink_adapter_reads_total{")
             and 'adapter="good"' in line]
    assert reads and reads[0].endswith(" 1.0"), reads  # at engine start only


@pytest.mark.engine
def test_runtime_load_use_unload_and_reload_a_rebuilt_adapter(admin, server):
    path = admin.root / "runtime" / "rt"
    first = noisy_adapter(admin.model, admin.tokenizer, path, PREFIX_LEN, seed=11)
    assert load(server, "rt", path).status_code == 200
    card = served_models(server)["rt"]
    assert card["parent"] == server.base and card["root"] == f"rt@sha256:{first.digest}"
    response = complete(server, "rt", echo=True, logprobs=0)
    assert response.json()["model"] == "rt"
    assert_matches_hf(admin, response, first)

    assert unload(server, "rt").status_code == 200
    assert "rt" not in served_models(server)
    assert_openai_error(complete(server, "rt"), 404, "rt")
    assert_openai_error(unload(server, "rt"), 404, "rt")

    # Same name, same path, same length, new weights: the prefix blocks cached for the
    # first build must not be reused (the cache salt holds the weights digest).
    second = noisy_adapter(admin.model, admin.tokenizer, path, PREFIX_LEN, seed=12)
    assert second.digest != first.digest
    assert load(server, "rt", path).status_code == 200
    response = complete(server, "rt", echo=True, logprobs=0)
    assert_matches_hf(admin, response, second)
    assert complete(server, "rt").json()["choices"][0]["token_ids"] != \
        hf_reference(admin.model, first, admin.tokenizer(QUERY, add_special_tokens=False)[
            "input_ids"], num_greedy=6).greedy_tokens

    # A loaded name is only replaced on request (like LoRA's load_inplace).
    third_path = admin.root / "runtime" / "rt-v3"
    third = noisy_adapter(admin.model, admin.tokenizer, third_path, 60, seed=13)
    assert_openai_error(load(server, "rt", third_path), 400, "already loaded")
    assert load(server, "rt", third_path, load_inplace=True).status_code == 200
    assert served_models(server)["rt"]["root"] == f"rt@sha256:{third.digest}"
    assert_matches_hf(admin, complete(server, "rt", echo=True, logprobs=0), third)
    assert unload(server, "rt").status_code == 200


@pytest.mark.engine
def test_running_request_finishes_with_the_adapter_it_started_with(admin, server):
    path = admin.root / "runtime" / "long"
    noisy_adapter(admin.model, admin.tokenizer, path, PREFIX_LEN, seed=14)
    assert load(server, "long", path).status_code == 200
    alone = complete(server, "long", max_tokens=96).json()["choices"][0]["text"]
    body = {"model": "long", "prompt": QUERY, "max_tokens": 96, "temperature": 0.0,
            "stream": True}
    text, unloaded = [], False
    with server.http.stream("POST", "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            if not unloaded:  # the request runs: take its adapter away
                assert unload(server, "long").status_code == 200
                unloaded = True
    assert unloaded and "".join(text) == alone
    assert_openai_error(complete(server, "long"), 404, "long")


@pytest.mark.engine
@pytest.mark.parametrize("kind", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_the_others_keep_serving(admin, server, kind):
    name = f"bad-{kind}"
    assert_openai_error(load(server, name, make_bad_adapter(admin, kind)), 400, name,
                        BAD_ADAPTERS[kind])
    assert name not in served_models(server)
    assert_openai_error(complete(server, name), 404, name)
    response = complete(server, "good")
    assert response.status_code == 200 and response.json()["model"] == "good"


@pytest.mark.engine
@pytest.mark.parametrize("name,status,reason", [
    ("../good", 400, "a name is never a path"),
    ("a/b", 400, "a name is never a path"),
    ("", 400, "must be provided"),
])
def test_path_like_adapter_names_are_refused(admin, server, name, status, reason):
    assert_openai_error(load(server, name, admin.root / "served-good"), status, reason)
    assert set(served_models(server)) == {server.base, "good"}


@pytest.mark.engine
def test_missing_adapter_is_refused(admin, server):
    assert_openai_error(load(server, "x", admin.root / "nowhere"), 400, "no such adapter")
    response = server.http.post("/v1/load_deepthink_adapter", json={"adapter_name": "x"})
    assert_openai_error(response, 400)  # adapter_path missing: vLLM's validation error


# ------------------------------------------------------------- refusing to start

def start_and_expect_exit(admin, args: list[str], log_name: str):
    from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer

    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    proc = VllmServer(admin.model_dir, args, log_path=admin.root / log_name)
    try:
        proc.start()
        code = proc.wait_for_exit(timeout=300)
        return code, proc.log_tail(20000)
    finally:
        proc.stop()


@pytest.mark.engine
def test_server_refuses_to_start_with_a_bad_adapter(admin):
    noisy_adapter(admin.model, admin.tokenizer, admin.root / "good", 24)
    code, log = start_and_expect_exit(admin, [
        "--deepthink-adapter", f"good={admin.root / 'good'}",
        "--deepthink-adapter", f"broken={make_bad_adapter(admin, 'nan')}",
        "--deepthink-adapter", f"alien={make_bad_adapter(admin, 'wrong-base')}"], "start-bad.log")
    assert code != 0
    assert "cannot serve 2 of 3 Deep-Thinking adapters" in log
    assert "broken (" in log and BAD_ADAPTERS["nan"] in log
    assert "alien (" in log and BAD_ADAPTERS["wrong-base"] in log


@pytest.mark.engine
def test_server_refuses_to_start_when_the_pinned_set_leaves_no_room_to_read(admin):
    from vllm_deepthink.plugin.connector.residency import load_footprint

    for name in ("good", "other"):
        adapter = noisy_adapter(admin.model, admin.tokenizer, admin.root / name, 24)
    fp = adapter.config.fingerprint
    one = load_footprint(24, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.num_kv_heads, 4)
    # Each adapter fits alone; the pinned copy plus a read of the other does not.
    code, log = start_and_expect_exit(admin, [
        "--deepthink-adapter", f"good={admin.root / 'good'}", f"other={admin.root / 'other'}",
        "--deepthink-pin", "good", "--deepthink-resident-gib", str(one.total / (1 << 30))],
        "start-pinned.log")
    assert code != 0
    assert f"the pinned adapters (good) need {one.resident} bytes" in log
    assert f"budget of {one.total} bytes" in log and "pin fewer adapters" in log


@pytest.mark.engine
def test_server_refuses_a_path_like_adapter_name(admin):
    code, log = start_and_expect_exit(
        admin, ["--deepthink-adapter", f"../good={admin.root / 'good'}"], "start-name.log")
    assert code == 2  # argparse
    assert "invalid Deep-Thinking adapter name '../good'" in log
