"""Names through the real server (one `vllm serve` for the module): a flood of random
model names reaches the hub resolver a bounded number of times; a LoRA and an adapter
never share a name; unloading an adapter of --deepthink-adapter-dir sticks; clients see
adapter names and digests, never the server's paths.

The hub resolver is the real HubResolver("org"), added by a `vllm.general_plugins`
entry point of the test's own (as a user's resolver plugin would be), over a real
hub-cache layout with HF_HUB_OFFLINE=1; the plugin counts huggingface_hub's
snapshot_download calls of the API server (one per hub lookup) in a log file."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.hub_cache import offline_env, publish
from tests.helpers.tiny_models import load_tiny, make_tiny_lora
from vllm_deepthink.plugin.resolvers import DEFAULT_MAX_LOOKUPS

pytestmark = pytest.mark.engine

QUERY = "Review: a charming film\nSentiment:"
# The workers' resident budget: 1 MiB holds the small adapters (about 0.2 MiB each to
# load, counting the transient peak of a read), not one of BIG_PREFIX_LEN positions.
BUDGET_GIB = 1 / 1024
BIG_PREFIX_LEN = 200

PLUGIN = '''"""Test resolver plugin: HubResolver('org'), hub lookups counted in $FAKE_HUB_LOG."""
import os
import threading
import time


def register():
    log = os.environ.get("FAKE_HUB_LOG")
    import huggingface_hub
    if not log or getattr(huggingface_hub.snapshot_download, "counted", False):
        return
    from vllm_deepthink.plugin.resolvers import HubResolver, register_resolver

    real, lock, state = huggingface_hub.snapshot_download, threading.Lock(), {"running": 0}

    def counted(repo_id, *args, **kwargs):
        with lock:
            state["running"] += 1
            with open(log, "a") as out:
                out.write(f"{repo_id} {state['running']}\\n")
        try:
            time.sleep(0.3)  # a slow hub: requests for one name overlap
            return real(repo_id, *args, **kwargs)
        finally:
            with lock:
                state["running"] -= 1

    counted.counted = True
    huggingface_hub.snapshot_download = counted
    register_resolver("test-org", HubResolver("org"))
'''


def write_plugin(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "names_test_plugin.py").write_text(PLUGIN)
    dist = directory / "names_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: names-test-plugin\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nnames_test = names_test_plugin:register\n")
    return directory


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    from tests.helpers.openai_server import VLLM_SCRIPT, VllmServer

    if not VLLM_SCRIPT.exists():
        pytest.skip(f"{VLLM_SCRIPT} not found (run `make install`)")
    httpx = pytest.importorskip("httpx")
    root = tmp_path_factory.mktemp("names")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    adapters = {name: noisy_adapter(model, tokenizer, path, 20 + n, seed=n)
                for n, (name, path) in enumerate({
                    "good": root / "good", "folder": root / "store" / "folder",
                    "hubbed": root / "hubbed"}.items())}
    # Over the server's resident budget (BUDGET_GIB), kept out of the directory at start.
    big = noisy_adapter(model, tokenizer, root / "big", BIG_PREFIX_LEN, seed=5)
    (root / "store" / "broken").mkdir()
    (root / "store" / "broken" / "deepthink_config.json").write_text("{}")
    cache = root / "hub"
    publish(root / "hubbed", cache, "org/published")
    publish(root / "big", cache, "org/bighub")
    lookups = root / "lookups.log"
    lookups.touch()
    env = {**offline_env(cache), "FAKE_HUB_LOG": str(lookups),
           "PYTHONPATH": f"{write_plugin(root / 'plugin')}:{REPO_ROOT}",
           "VLLM_ALLOW_RUNTIME_DEEPTHINK_UPDATING": "True",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    args = ["--deepthink-adapter", f"good={root / 'good'}",
            "--deepthink-adapter-dir", str(root / "store"),
            "--deepthink-resident-gib", str(BUDGET_GIB),
            "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
            "--lora-modules", f"lora1={make_tiny_lora(tiny_llama_dir, root / 'lora1')}"]
    # broken is in the directory: the server must not start with it; it is added later
    (root / "store" / "broken").rename(root / "broken-later")
    proc = VllmServer(tiny_llama_dir, args, log_path=root / "server.log", env=env)
    try:
        proc.start()
        proc.wait_until_healthy()
        with httpx.Client(base_url=proc.base_url, timeout=180.0) as http:
            yield SimpleNamespace(http=http, proc=proc, root=root, adapters=adapters,
                                  lookups=lookups, lora=root / "lora1", big=big,
                                  model=model, tokenizer=tokenizer)
    finally:
        proc.stop()


def hub_lookups(server) -> list[tuple[str, int]]:
    """(repo id, lookups running at its start) of every hub lookup so far."""
    lines = server.lookups.read_text().split()
    return [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)
            if lines[i].startswith("org/")]


def complete(server, model: str):
    return server.http.post("/v1/completions", json={
        "model": model, "prompt": QUERY, "max_tokens": 2, "temperature": 0.0})


def models(server) -> dict[str, dict]:
    response = server.http.get("/v1/models")
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


def assert_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_flood_of_random_names_is_bounded(server):
    names = [f"rnd-{uuid.uuid4().hex[:10]}" for _ in range(10)]
    flood = names * 4  # every name four times at once
    before = len(hub_lookups(server))
    with ThreadPoolExecutor(len(flood)) as pool:
        responses = list(pool.map(lambda name: complete(server, name), flood))
    for response in responses:
        assert_error(response, 404, "does not exist")
    lookups = hub_lookups(server)[before:]
    assert sorted(repo for repo, _ in lookups) == sorted(f"org/{n}" for n in names)
    assert max(running for _, running in lookups) <= DEFAULT_MAX_LOOKUPS
    with ThreadPoolExecutor(len(flood)) as pool:  # remembered: no lookup at all
        assert {r.status_code for r in pool.map(lambda n: complete(server, n), flood)} == {404}
    assert len(hub_lookups(server)) == before + len(names)
    assert complete(server, "good").status_code == 200  # the server serves everyone else


def test_a_burst_for_a_new_hub_adapter_looks_it_up_and_serves_it_once(server):
    with ThreadPoolExecutor(8) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: complete(server, "published"),
                                                    range(8))]
    assert statuses == [200] * 8
    assert [repo for repo, _ in hub_lookups(server)].count("org/published") == 1
    card = models(server)["published"]
    assert card["root"] == f"published@sha256:{server.adapters['hubbed'].digest}"


def test_models_and_errors_show_names_and_digests_not_server_paths(server):
    cards = models(server)
    assert cards["good"]["root"] == f"good@sha256:{server.adapters['good'].digest}"
    assert cards["folder"]["root"] == f"folder@sha256:{server.adapters['folder'].digest}"
    (server.root / "broken-later").rename(server.root / "store" / "broken")
    message = assert_error(complete(server, "broken"), 400,
                           "'broken' found at <adapter-dir>/broken cannot be served")
    assert str(server.root) not in message
    for name in ("good", "folder"):
        assert str(server.root) not in cards[name]["root"]  # parent: the served model name


def lora_load(server, name: str):
    return server.http.post("/v1/load_lora_adapter",
                            json={"lora_name": name, "lora_path": str(server.lora)})


def test_a_lora_and_an_adapter_never_share_a_name(server):
    for name in ("good", "folder"):  # served, and in the adapter directory
        assert_error(lora_load(server, name), 400, f"'{name}'", "Deep-Thinking adapter")
    assert models(server)[name]["root"].startswith(f"{name}@sha256:")
    assert complete(server, "good").status_code == 200
    response = server.http.post("/v1/load_deepthink_adapter", json={
        "adapter_name": "lora1", "adapter_path": str(server.root / "good")})
    assert_error(response, 400, "'lora1'", "LoRA")
    assert lora_load(server, "lora2").status_code == 200  # other names are free
    assert complete(server, "lora2").status_code == 200


def test_unloading_a_directory_adapter_sticks_until_loaded_again(server):
    assert complete(server, "folder").status_code == 200
    response = server.http.post("/v1/unload_deepthink_adapter", json={"adapter_name": "folder"})
    assert response.status_code == 200, response.text
    for _ in range(2):  # the directory still holds it: no request brings it back
        assert_error(complete(server, "folder"), 404)
    assert "folder" not in models(server)
    response = server.http.post("/v1/load_deepthink_adapter", json={
        "adapter_name": "folder", "adapter_path": str(server.root / "store" / "folder")})
    assert response.status_code == 200, response.text
    assert complete(server, "folder").status_code == 200
    assert re.fullmatch(r"folder@sha256:[0-9a-f]{64}", models(server)["folder"]["root"])


def test_an_adapter_over_the_resident_budget_is_refused_by_every_route(server):
    """The load endpoint, --deepthink-adapter-dir and the hub resolver refuse an adapter
    no worker could hold with a 400 naming the bytes needed and the budget, and the
    server serves the next request (before: loaded and listed, and every request naming
    it ended with finish reason `error`)."""
    wanted = ("adapter 'big' (200 positions) needs", "resident-adapter budget of "
              f"{int(BUDGET_GIB * (1 << 30))} bytes", "--deepthink-resident-gib")
    response = server.http.post("/v1/load_deepthink_adapter", json={
        "adapter_name": "big", "adapter_path": str(server.root / "big")})
    assert_error(response, 400, *wanted)
    assert complete(server, "good").status_code == 200
    shutil.copytree(server.root / "big", server.root / "store" / "big")
    for model in ("big", "bighub"):  # the adapter directory, the hub resolver
        for _ in range(2):
            assert_error(complete(server, model), 400, *wanted[1:], f"'{model}' found at")
    assert not {"big", "bighub"} & set(models(server))
    response = complete(server, "good")
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] \
        != "error"


def test_an_edited_directory_adapter_is_served_with_its_new_weights(server):
    """--deepthink-adapter-dir: an adapter rebuilt in place is registered again (its
    files' mtime changed) and served with its new digest (before: the first digest was
    kept, /v1/models showed it, and the workers refused the changed files)."""
    path = server.root / "store" / "edited"
    first = noisy_adapter(server.model, server.tokenizer, path, 30, seed=21)
    assert complete(server, "edited").status_code == 200
    assert models(server)["edited"]["root"] == f"edited@sha256:{first.digest}"
    second = noisy_adapter(server.model, server.tokenizer, path, 34, seed=22)
    for file in path.iterdir():  # a clock tick later than the first build
        os.utime(file, (file.stat().st_atime, file.stat().st_mtime + 5))
    response = complete(server, "edited")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] != "error"
    assert models(server)["edited"]["root"] == f"edited@sha256:{second.digest}"
