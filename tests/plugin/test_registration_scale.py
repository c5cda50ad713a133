"""Issue 35 item 2: registering many adapters reads each weights file once per process
(remembered by path, size and mtime), serves the right adapter under each name, never
lists the adapter directory per request, and /v1/models touches no file (no engine)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.adapter_factory import count_reads
from vllm_deepthink.apps.registration_cost import synthetic_adapters
from vllm_deepthink.format import WEIGHTS_NAME, load_config
from vllm_deepthink.format.adapter import clear_checked_files
from vllm_deepthink.plugin import registry as adapter_registry
from vllm_deepthink.plugin import resolvers
from vllm_deepthink.plugin.resolvers import DirectoryResolver
from vllm_deepthink.plugin.serving.flags import adapters_in_dir

COUNT = 24


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    synthetic_adapters(tiny_llama_dir, root / "store", COUNT, prefix_len=12)
    return SimpleNamespace(model_dir=tiny_llama_dir, dir=root / "store")


def start(store) -> adapter_registry.AdapterRegistry:
    """What a server started with --deepthink-adapter-dir does: one scan, every adapter
    registered."""
    registry = adapter_registry.AdapterRegistry(store.model_dir,
                                                resolvers=[DirectoryResolver(store.dir)])
    registry.register_at_start(adapters_in_dir(store.dir))
    assert registry.failed() == {}
    return registry


def drop_in(store, tmp_path, name: str) -> Path:
    """An adapter put into the adapter directory after start, as `name`."""
    synthetic_adapters(store.model_dir, tmp_path / name, 1, prefix_len=12)
    return (tmp_path / name / "a00000").rename(store.dir / name)


def remove(directory: Path) -> None:
    for path in list(directory.iterdir()):
        path.unlink()
    directory.rmdir()


def weights(store, name: str) -> Path:
    return store.dir / name / WEIGHTS_NAME


def test_each_weights_file_is_read_once_and_each_name_serves_its_own(store, monkeypatch):
    clear_checked_files()
    reads = count_reads(monkeypatch)
    registry = start(store)
    names = registry.names()
    assert len(names) == COUNT
    assert sorted(reads) == sorted(weights(store, name) for name in names)  # once each
    for name in (names[0], names[COUNT // 2], names[-1]):
        info = registry.get(name)
        assert info.digest == hashlib.sha256(weights(store, name).read_bytes()).hexdigest()
        assert info.placeholder_ids == tuple(load_config(store.dir / name).demo_token_ids)
        assert info.cache_salt() == f"deepthink:{name}:{info.digest}"
    assert len({registry.get(name).digest for name in names}) == COUNT
    assert len(reads) == COUNT  # requests for registered names read nothing


def test_a_second_registry_in_the_process_does_not_hash_again(store, monkeypatch):
    first = start(store)
    reads = count_reads(monkeypatch)
    second = start(store)
    assert reads == []
    assert [i.digest for i in second.infos()] == [i.digest for i in first.infos()]
    # A file whose mtime changed is read again, alone.
    name = first.names()[3]
    path = weights(store, name)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    third = start(store)
    assert reads == [path] and third.get(name).digest == first.get(name).digest


def test_a_request_never_lists_the_adapter_directory(store, tmp_path, monkeypatch):
    """A name not registered at start is looked up as DIR/NAME (a stat), never by a
    listing of DIR: a directory of thousands of adapters costs a request nothing more."""
    registry = start(store)
    late = drop_in(store, tmp_path, "late")
    listed = []
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir",
                        lambda self: listed.append(self) or iterdir(self))
    monkeypatch.setattr(resolvers.DirectoryResolver, "names",
                        lambda self: pytest.fail("the adapter directory was scanned"))
    try:
        for _ in range(3):
            assert registry.get("late").prefix_len == 12
        assert registry.lookup("nosuch") is None
    finally:
        remove(late)
    assert store.dir not in listed


def test_v1_models_cards_touch_no_file(store, tmp_path, monkeypatch):
    """Not even a stat of the folder adapters resolved since start (a request for one
    checks its files; listing it does not)."""
    pytest.importorskip("vllm")
    from vllm_deepthink.plugin.serving import models as serving_models

    registry = start(store)
    late = drop_in(store, tmp_path, "late")
    try:
        assert registry.get("late") is not None
    finally:
        remove(late)
    monkeypatch.setattr(serving_models, "registry_of", lambda models: registry)
    monkeypatch.setattr(adapter_registry, "files_mtime",
                        lambda location: pytest.fail("a file was touched"))
    monkeypatch.setattr(Path, "stat", lambda self, **k: pytest.fail(f"stat {self}"))
    models = SimpleNamespace(base_model_paths=[SimpleNamespace(name="base")],
                             model_config=SimpleNamespace(max_model_len=256))
    cards = serving_models.model_cards(models)
    infos = registry.infos()
    assert [c.id for c in cards] == [i.name for i in infos] and len(cards) == COUNT + 1
    assert [c.root for c in cards] == [f"{i.name}@sha256:{i.digest}" for i in infos]
    assert {c.max_model_len for c in cards} == {256 - 12}


def test_messages_name_a_few_adapters_then_how_many_more(store):
    registry = start(store)
    text = registry.names_text(limit=5)
    assert text.startswith(", ".join(registry.names()[:5])) and text.endswith(
        f"and {COUNT - 5} more")
    assert registry.names_text(limit=COUNT, as_list=True) == str(registry.names())
