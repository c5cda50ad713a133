"""Resolvers and the registry under many names, offline: HubResolver's bounds (a
size-capped ttl cache, one lookup per name, a cap on lookups at once, failures
remembered briefly, sizes checked before download, ORG/NAME never a local directory),
the registry's one validation per new name, unload that sticks, and errors that name
adapters without the server's paths. The hub API is monkeypatched (no network)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import HfApi, RepoSibling

from tests.helpers.adapter_factory import noisy_adapter, count_reads
from tests.helpers.hub_cache import publish
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import CONFIG_NAME, WEIGHTS_NAME, load_config
from vllm_deepthink.plugin import request_checks, resolvers
from vllm_deepthink.plugin import registry as adapter_registry
from vllm_deepthink.plugin.connector.residency import MAX_FILE_ITEMSIZE
from vllm_deepthink.plugin.connector.resident import config_footprint
from vllm_deepthink.plugin.resolvers import (AdapterRefused, DirectoryResolver, HubResolver,
                                             ResolverUnavailable)


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/api"))


class FakeHub:
    """HfApi.model_info and snapshot_download of an online hub, counted: `repos` maps
    repo ids to {file: size}; `fail` maps repo ids to the exception to raise."""

    def __init__(self, monkeypatch, tmp_path, repos=None, fail=None, gate=None):
        self.repos, self.fail, self.gate = dict(repos or {}), dict(fail or {}), gate
        self.infos, self.downloads, self.running, self.most = [], [], 0, 0
        self.tmp_path, self._lock = tmp_path, threading.Lock()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(HfApi, "model_info", self.model_info)
        monkeypatch.setattr("huggingface_hub.snapshot_download", self.snapshot_download)

    def model_info(self, repo_id, *, revision=None, files_metadata=False, timeout=None):
        assert files_metadata, "sizes need files_metadata=True"
        with self._lock:
            self.infos.append(repo_id)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                self.gate.wait(timeout=60)
            if repo_id in self.fail:
                raise self.fail[repo_id]
            if repo_id not in self.repos:
                raise RepositoryNotFoundError("404 Repository Not Found", response=_response(404))
            return SimpleNamespace(sha="c0ffee" * 6 + "c0ff", siblings=[
                RepoSibling(rfilename=f, size=s) for f, s in self.repos[repo_id].items()])
        finally:
            with self._lock:
                self.running -= 1

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **_):
        self.downloads.append((repo_id, revision))
        snapshot = self.tmp_path / "snapshots" / repo_id / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            (snapshot / name).write_bytes(b"x" * self.repos[repo_id][name])
        return str(snapshot)


ADAPTER_FILES = {CONFIG_NAME: 100, WEIGHTS_NAME: 1000, "README.md": 10}


def test_sizes_are_checked_before_anything_is_downloaded(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, {"org/small": ADAPTER_FILES,
                                          "org/huge": {CONFIG_NAME: 100, WEIGHTS_NAME: 10**12},
                                          "org/model": {"config.json": 10}})
    resolver = HubResolver("org", max_bytes=5000)
    found = resolver.resolve("small")
    assert found is not None and sorted(p.name for p in (tmp_path / "snapshots").rglob("*.*")) \
        == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert hub.downloads == [("org/small", "c0ffee" * 6 + "c0ff")]  # pinned to the sized commit
    with pytest.raises(AdapterRefused, match="1000000000100 bytes, above the limit of 5000"):
        resolver.resolve("huge")
    assert resolver.resolve("model") is None  # a repository without an adapter
    assert [d[0] for d in hub.downloads] == ["org/small"]
    with pytest.raises(AdapterRefused):  # the refusal is remembered, not asked again
        resolver.resolve("huge")
    assert hub.infos == ["org/small", "org/huge", "org/model"]


def test_default_size_cap_is_the_default_resident_budget():
    from vllm_deepthink.plugin.protocol import DEFAULT_RESIDENT_GIB

    assert HubResolver("org").max_bytes == int(DEFAULT_RESIDENT_GIB * 2**30)


def test_hub_failures_are_remembered_much_shorter_than_missing_names(monkeypatch, tmp_path):
    clock = [1000.0]
    monkeypatch.setattr(resolvers.time, "monotonic", lambda: clock[0])
    hub = FakeHub(monkeypatch, tmp_path, {"org/later": ADAPTER_FILES}, fail={
        "org/later": HfHubHTTPError("429 Too Many Requests", response=_response(429)),
        "org/slow": httpx2.ReadTimeout("timed out"),
        "org/down": httpx2.ConnectError("connection refused")})
    resolver = HubResolver("org", retry_after=300, error_retry_after=10)
    for name in ("later", "slow", "down"):
        with pytest.raises(ResolverUnavailable, match="try again"):
            resolver.resolve(name)
    assert resolver.resolve("gone") is None
    asked = len(hub.infos)
    clock[0] += 5  # within both ttls: nothing asked
    for name in ("later", "slow", "down"):
        with pytest.raises(ResolverUnavailable):
            resolver.resolve(name)
    assert resolver.resolve("gone") is None and len(hub.infos) == asked
    clock[0] += 10  # past the error ttl: the hub answers now, the adapter is found
    del hub.fail["org/later"]
    assert resolver.resolve("later") is not None
    assert resolver.resolve("gone") is None
    assert hub.infos.count("org/later") == 2 and hub.infos.count("org/gone") == 1
    clock[0] += 300
    assert resolver.resolve("gone") is None and hub.infos.count("org/gone") == 2


def test_one_lookup_per_name_and_a_cap_on_lookups_at_once(monkeypatch, tmp_path):
    gate = threading.Event()
    hub = FakeHub(monkeypatch, tmp_path, {"org/new": ADAPTER_FILES}, gate=gate)
    resolver = HubResolver("org", max_lookups=2)
    with ThreadPoolExecutor(16) as pool:
        same = [pool.submit(resolver.resolve, "new") for _ in range(8)]
        others = [pool.submit(resolver.resolve, f"random-{i}") for i in range(8)]
        while hub.running < 2:  # the cap is reached; the other lookups wait for a slot
            threading.Event().wait(0.01)
        gate.set()
        results = {f.result() for f in same}
        assert [f.result() for f in others] == [None] * 8
    assert len(results) == 1 and None not in results
    assert hub.infos.count("org/new") == 1 and len(hub.downloads) == 1
    assert len(hub.infos) == 9 and hub.most == 2


def test_the_cache_is_size_capped(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path)
    resolver = HubResolver("org", cache_size=3)
    for i in range(20):
        assert resolver.resolve(f"name-{i}") is None
    assert resolver.cached_names() == 3
    assert resolver.resolve("name-19") is None and len(hub.infos) == 20  # newest kept
    assert resolver.resolve("name-0") is None and len(hub.infos) == 21  # oldest dropped


def test_a_hub_id_is_never_a_directory_under_the_working_directory(monkeypatch, tmp_path):
    """ORG/NAME of a client's model name must not pick up ./ORG/NAME of the server."""
    cache = tmp_path / "cache"
    local = tmp_path / "cwd" / "org" / "planted"
    local.mkdir(parents=True)
    (local / CONFIG_NAME).write_text("{}")
    (local / WEIGHTS_NAME).write_bytes(b"")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert HubResolver("org").resolve("planted") is None
    # the hub cache's copy is what the name means
    source = tmp_path / "published"
    source.mkdir()
    (source / CONFIG_NAME).write_text("{}")
    (source / WEIGHTS_NAME).write_bytes(b"12345678")
    commit = publish(source, cache, "org/planted")
    found = HubResolver("org").resolve("planted")
    assert found == str(cache / "models--org--planted" / "snapshots" / commit)
    with pytest.raises(AdapterRefused, match="above the limit of 8 bytes"):
        HubResolver("org", max_bytes=8).resolve("planted")  # cached files are sized too


def test_the_load_endpoint_reads_org_name_from_the_hub_not_the_working_directory(
        monkeypatch, tmp_path):
    """/v1/load_deepthink_adapter with adapter_path ORG/NAME: the hub (sizes capped by
    the resident budget), never ./ORG/NAME unless written so."""
    from vllm_deepthink.format import AdapterFormatError
    from vllm_deepthink.format.hub import HubFileTooLarge
    from vllm_deepthink.plugin.serving import models as serving

    def models(resident_gib=None):
        extra = {} if resident_gib is None else {"resident_gib": resident_gib}
        kv = SimpleNamespace(kv_connector_extra_config=extra)
        return SimpleNamespace(engine_client=SimpleNamespace(
            vllm_config=SimpleNamespace(kv_transfer_config=kv)))

    cache = tmp_path / "cache"
    local = tmp_path / "cwd" / "org" / "planted"
    local.mkdir(parents=True)
    (local / CONFIG_NAME).write_text("{}")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(AdapterFormatError, match="write './org/planted'"):
        serving._local_location(models(), "org/planted")
    for explicit in ("./org/planted", str(local)):
        assert serving._local_location(models(), explicit) == explicit
    source = tmp_path / "published"
    source.mkdir()
    (source / CONFIG_NAME).write_text("{}")
    (source / WEIGHTS_NAME).write_bytes(b"123456789")
    commit = publish(source, cache, "org/planted")
    assert serving._local_location(models(), "org/planted") == str(
        cache / "models--org--planted" / "snapshots" / commit)
    with pytest.raises(HubFileTooLarge, match="11 bytes, above the limit of 10 bytes"):
        serving._local_location(models(resident_gib=10 / 2**30), "org/planted")


# ------------------------------------------------------------------- the registry

@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    return tiny_llama_dir, model, tokenizer


@pytest.fixture()
def store(llama, tmp_path):
    _, model, tokenizer = llama
    noisy_adapter(model, tokenizer, tmp_path / "store" / "a", 12, seed=1)
    return tmp_path / "store"


def test_a_burst_of_first_requests_validates_a_new_adapter_once(llama, store, monkeypatch):
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)])
    registry.model_fingerprint()
    burst, claims, validations = 8, [], []
    all_claimed = threading.Event()
    claim, load = registry.claim_lookup, adapter_registry.check_adapter

    def counting_claim(name):
        claims.append(name)
        if len(claims) == burst:
            all_claimed.set()
        return claim(name)

    def counting_load(*args, **kwargs):
        validations.append(args)
        all_claimed.wait(timeout=60)  # every request has arrived while it validates
        return load(*args, **kwargs)

    monkeypatch.setattr(registry, "claim_lookup", counting_claim)
    monkeypatch.setattr(adapter_registry, "check_adapter", counting_load)
    with ThreadPoolExecutor(burst) as pool:
        infos = list(pool.map(registry.lookup, ["a"] * burst))
    assert len(validations) == 1 and len({id(i) for i in infos}) == 1
    assert infos[0].prefix_len == 12


def test_async_callers_share_one_future_per_name(llama, store):
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)])
    claims = [registry.claim_lookup("a") for _ in range(4)]
    assert [owner for _, owner in claims] == [True, False, False, False]
    assert len({id(future) for future, _ in claims}) == 1
    registry.run_lookup("a", claims[0][0])
    assert claims[3][0].result().prefix_len == 12
    future, owner = registry.claim_lookup("a")  # registered now: settled at once
    assert not owner and future.result().prefix_len == 12


def test_unloading_a_directory_adapter_sticks_until_it_is_loaded_again(llama, store):
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)])
    assert registry.get("a").prefix_len == 12 and registry.holds("a")
    registry.unregister("a")
    assert registry.lookup("a") is None  # the directory still holds it
    assert not registry.holds("a")  # a LoRA may take the name now
    with pytest.raises(request_checks.UnknownAdapterError, match="unknown adapter 'a'"):
        registry.get("a")
    registry.register("a", store / "a")
    assert registry.names() == ["a"]
    registry.unregister("a")
    registry.register("a", store / "a")
    assert registry.get("a").prefix_len == 12


def test_errors_name_the_adapter_not_the_server_path(llama, store):
    (store / "broken").mkdir()
    (store / "broken" / CONFIG_NAME).write_text("{}")
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)])
    with pytest.raises(request_checks.AdapterRequestError) as caught:
        registry.get("broken")
    message = str(caught.value)
    assert "'broken' found at <adapter-dir>/broken cannot be served" in message
    assert str(store) not in message and str(store.resolve()) not in message
    registry.register_at_start({"gone": str(store / "gone")})
    assert str(store) not in registry.failed()["gone"]


def test_unavailable_resolvers_are_a_retry_later_error_and_others_still_answer(llama, store):
    class Down:
        def resolve(self, name):
            raise ResolverUnavailable("rate limited")

    registry = adapter_registry.AdapterRegistry(llama[0],
                                                resolvers=[Down(), DirectoryResolver(store)])
    assert registry.get("a").prefix_len == 12
    with pytest.raises(request_checks.AdapterLookupUnavailable, match="could not be looked up now"):
        registry.get("nosuch")


def footprint_of(path) -> int:
    """Bytes the registration check counts for the adapter at `path` (tensor parallel 1)."""
    return config_footprint(load_config(path), 1, 0, MAX_FILE_ITEMSIZE).total


def test_an_adapter_larger_than_the_resident_budget_is_refused_at_registration(
        llama, store, monkeypatch):
    """Runtime load endpoint, add_adapter and the resolvers: refused from the config
    before the weights are read, naming the bytes needed and the budget (before: served,
    and only refused by the workers when a request named it, finish reason `error`)."""
    _, model, tokenizer = llama
    noisy_adapter(model, tokenizer, store / "big", 40, seed=2)
    budget = footprint_of(store / "a")  # "a" (12 positions) fits exactly, "big" does not
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)],
                                        resident_budget=budget)
    reads = count_reads(monkeypatch)
    need = footprint_of(store / "big")
    for attempt in (lambda: registry.register("big", store / "big"),  # load endpoint
                    lambda: registry.get("big")):                      # --deepthink-adapter-dir
        with pytest.raises(request_checks.AdapterRequestError) as caught:
            attempt()
        message = str(caught.value)
        assert f"adapter 'big' (40 positions) needs {need} bytes" in message
        assert f"budget of {budget} bytes" in message and "--deepthink-resident-gib" in message
    assert reads == [] and registry.names() == []
    assert registry.get("a").prefix_len == 12 and registry.names() == ["a"]


def test_the_room_pinned_adapters_hold_is_not_offered_to_others(llama, store):
    """A pinned adapter is never evicted: an adapter registered later must fit in the
    budget minus the pinned bytes (before: accepted, then every request for it failed
    in the workers)."""
    budget = footprint_of(store / "a")  # "a" alone fits exactly
    registry = adapter_registry.AdapterRegistry(llama[0], resident_budget=budget,
                                                pinned={"p": 1000})
    with pytest.raises(request_checks.AdapterRequestError) as caught:
        registry.register("a", store / "a")
    assert ("leaves beside the pinned adapters (1000 bytes)" in str(caught.value)
            and "pin fewer adapters" in str(caught.value))
    # The pinned adapter itself is counted once: against the whole budget.
    registry = adapter_registry.AdapterRegistry(llama[0], resident_budget=budget,
                                                pinned={"a": budget})
    assert registry.register("a", store / "a").prefix_len == 12


def test_an_edited_folder_adapter_is_served_with_its_new_digest(llama, store, monkeypatch):
    """--deepthink-adapter-dir: the registration follows the files (their latest mtime),
    checked with a stat and no read while they are unchanged (before: the digest of the
    first registration was served forever, and every worker load failed its digest
    check)."""
    _, model, tokenizer = llama
    registry = adapter_registry.AdapterRegistry(llama[0], resolvers=[DirectoryResolver(store)])
    first = registry.get("a")
    reads = count_reads(monkeypatch)
    assert registry.get("a") is first and reads == []

    def edit(**kwargs):
        adapter = noisy_adapter(model, tokenizer, store / "a", **kwargs)
        for path in (store / "a").iterdir():  # a clock tick later than the first build
            os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5 * len(reads) + 5))
        return adapter

    second = edit(prefix_len=16, seed=9)
    assert second.digest != first.digest
    with ThreadPoolExecutor(4) as pool:  # one validation for a burst after the edit
        infos = list(pool.map(registry.get, ["a"] * 4))
    assert {(i.digest, i.prefix_len) for i in infos} == {(second.digest, 16)}
    assert len(reads) == 1 and registry.names() == ["a"]
    assert registry.get("a").digest == second.digest and len(reads) == 1

    (store / "a" / WEIGHTS_NAME).write_bytes(b"broken")  # edited into a bad adapter
    os.utime(store / "a" / WEIGHTS_NAME, (0, (store / "a" / CONFIG_NAME).stat().st_mtime + 60))
    with pytest.raises(request_checks.AdapterRequestError,
                       match="'a' found at .* cannot be served"):
        registry.get("a")
    assert registry.names() == []  # the stale registration is not served either
