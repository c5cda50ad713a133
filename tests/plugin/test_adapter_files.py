"""Issue 32, the engine-free half: hostile adapter files reach the adapter registry as
AdapterFormatError / AdapterRequestError naming the field (a 400 on the load endpoint and
on --deepthink-adapter-dir, a start-up error for --deepthink-adapter), ids enter prompts
as ints, and the output-side patch is inert without our connector and never raises on
the entry's `frontend` token. The HTTP half: tests/plugin/test_security_http.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tests.helpers.adapter_factory import noisy_adapter, count_reads
from tests.helpers.hostile_adapters import CASES, make_hostile
from tests.helpers.tiny_models import load_tiny

vllm = pytest.importorskip("vllm")

from vllm.v1.engine.output_processor import RequestState  # noqa: E402

import vllm_deepthink  # noqa: E402
from vllm_deepthink import plugin  # noqa: E402
from vllm_deepthink.format import AdapterFormatError  # noqa: E402
from vllm_deepthink.plugin import protocol, request_checks, rewrite  # noqa: E402
from vllm_deepthink.plugin import registry as adapter_registry  # noqa: E402
from vllm_deepthink.plugin.serving import models as serving_models  # noqa: E402
from vllm_deepthink.plugin.resolvers import DirectoryResolver  # noqa: E402
from tests.plugin.test_security_units import processor, run, tokens  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()


@pytest.fixture(scope="module")
def files(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-files")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    noisy_adapter(model, tokenizer, root / "good", 40, seed=1)
    store = root / "store"
    store.mkdir()
    hostile = make_hostile(root / "good", store)
    return SimpleNamespace(root=root, model_dir=tiny_llama_dir, good=root / "good",
                           store=store, hostile=hostile)


@pytest.fixture(scope="module")
def served(files):
    return processor(files, **vllm_deepthink.engine_args(adapters={"good": files.good}))


# ------------------------------------------------------------------ items 1 and 2

@pytest.mark.parametrize("case", list(CASES))
def test_the_registry_refuses_each_hostile_adapter_naming_the_field(files, case):
    """Runtime load endpoint and add_adapter: register() raises AdapterFormatError (a 400
    there); before the fix several cases raised TypeError / ValueError / RecursionError
    (a 500) or were served (float ids: the engine hung)."""
    registry = adapter_registry.AdapterRegistry(files.model_dir)
    with pytest.raises(AdapterFormatError) as info:
        registry.register(case, files.hostile[case])
    assert CASES[case][1] in str(info.value)
    assert registry.names() == []


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_adapter_in_an_adapter_dir_is_refused_once(files, case, monkeypatch):
    """--deepthink-adapter-dir: the first request naming it gets the reason (a 400); the
    refusal is remembered until the files change, so the next one reads nothing."""
    registry = adapter_registry.AdapterRegistry(files.model_dir,
                                                resolvers=[DirectoryResolver(files.store)])
    with pytest.raises(request_checks.AdapterRequestError) as info:
        registry.get(case)
    assert CASES[case][1] in str(info.value) and info.value.param in (None, "model")
    reads = count_reads(monkeypatch)
    monkeypatch.setattr(adapter_registry, "load_config_and_digest",
                        lambda *a, **k: reads.append(a))
    with pytest.raises(request_checks.AdapterRequestError, match="cannot be served"):
        registry.get(case)
    assert reads == []


def test_hostile_start_adapters_stop_the_server_naming_each_field(files, served, monkeypatch):
    """--deepthink-adapter: the server does not start, and says which adapter and which
    field (vLLM prints the ValueError of init_static_loras and exits)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    registry = adapter_registry.AdapterRegistry(files.model_dir)
    registry.register_at_start({"good": str(files.good),
                                **{case: str(path) for case, path in files.hostile.items()}})
    assert registry.names() == ["good"]
    monkeypatch.setattr(serving_models, "registry_for", lambda vllm_config: registry)
    models = SimpleNamespace(static_lora_modules=None,
                             engine_client=SimpleNamespace(vllm_config=served.vllm_config))
    with pytest.raises(ValueError) as info:
        asyncio.run(OpenAIServingModels.init_static_loras(models))
    message = str(info.value)
    assert f"cannot serve {len(CASES)} Deep-Thinking adapters" in message
    for case, (_, fragment) in CASES.items():
        assert f"- {case}: " in message and fragment in message, case


def test_placeholder_ids_enter_the_prompt_as_ints():
    """The engine core decodes prompt_token_ids as list[int]: ids that compare equal (5.0,
    True) but are not ints killed its input thread."""
    info = adapter_registry.AdapterInfo(name="a", path="/x", digest="0" * 64, prefix_len=2,
                                placeholder_ids=(5.0, True))
    engine_input, _ = rewrite.rewrite_request(
        info, tokens([7, 8]), vllm.SamplingParams(), None, 512)
    assert engine_input["prompt_token_ids"] == [5, 1, 7, 8]
    assert [type(i) for i in engine_input["prompt_token_ids"]] == [int] * 4


# ------------------------------------------------------------------ item 6

@pytest.mark.parametrize("token", ["\u00e9" * 32, "A" * 32, "0" * 31, "0" * 33, 5, None])
def test_wrote_never_raises_on_a_hostile_frontend_token(token):
    """compare_digest raised TypeError on a non-ASCII str (and on non-str values)."""
    entry = protocol.TransferEntry("a", "/x", "0" * 64, 2, token)
    assert rewrite.wrote(entry) is False
    assert rewrite.wrote(protocol.TransferEntry("a", "/x", "0" * 64, 2,
                                                 adapter_registry.FRONTEND_TOKEN)) is True


def test_the_request_state_patch_is_inert_without_our_connector(served, monkeypatch):
    """Even an entry carrying this frontend's token changes nothing in a process where no
    engine runs our connector (the patch had no gate: only the token check)."""
    request = run(served, tokens([5, 6, 7]), vllm_deepthink.sampling_params(adapter="good"))
    request.external_req_id = "req-0"
    placeholders = list(request.prompt_token_ids[:-3])

    def state():
        return RequestState.from_new_request(
            tokenizer=None, request=request, prompt=None, parent_req=None, request_index=0,
            queue=None, log_stats=False, stream_interval=1)

    assert adapter_registry.connector_configured()
    assert list(state().prompt_token_ids) == [5, 6, 7]
    monkeypatch.setattr(adapter_registry, "_registries", {})
    assert not adapter_registry.connector_configured()
    plain = state()
    assert type(plain) is RequestState and list(plain.prompt_token_ids) == placeholders + [5, 6, 7]


@pytest.mark.subprocess
def test_vllm_serve_with_hostile_start_adapters_exits_naming_each_field(files):
    """`vllm serve --deepthink-adapter` / `--deepthink-adapter-dir` with hostile adapters:
    exit status 1 before the engine starts, one line per adapter naming the field, no
    traceback (before: a traceback, and for several cases a TypeError / RecursionError
    instead of the reason, or a server that started and hung on the first request)."""
    import subprocess

    from tests.helpers.openai_server import VLLM_SCRIPT, engine_env

    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    result = subprocess.run(
        [str(VLLM_SCRIPT), "serve", str(files.model_dir), "--max-model-len", "512",
         "--port", "0", "--deepthink-adapter", f"good={files.good}",
         "--deepthink-adapter", f"start-float={files.hostile['float-demo-id']}",
         "--deepthink-adapter-dir", str(files.store)],
        capture_output=True, text=True, timeout=300, env=engine_env())
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "vllm serve: error: cannot serve" in result.stderr
    lines = result.stderr.splitlines()
    for name, fragment in [("start-float", CASES["float-demo-id"][1]),
                           *((case, fragment) for case, (_, fragment) in CASES.items())]:
        line = next((line for line in lines if line.startswith(f"  - {name} (")), "")
        assert fragment in line, f"{name}: {line or 'not named'}"
    assert not any(line.startswith("  - good (") for line in lines)
