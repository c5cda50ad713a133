"""`build_manifest`: many adapters from one JSONL manifest, resumable, failures reported
without stopping the others, in this process and on a local Ray instance (tiny model,
two iterations, no dev scoring)."""

from __future__ import annotations

import inspect
import json

import pytest

from tests.helpers.manifests import MISSING as BAD
from tests.helpers.manifests import SST2, TREC, write_manifest
from vllm_deepthink import DeepThinkAdapter
from vllm_deepthink.producers.deepthink import manifest_workers
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.from_task import build_from_task
from vllm_deepthink.producers.deepthink.manifest import (
    BUILD_FIELDS,
    SUMMARY_NAME,
    ManifestError,
    build_manifest,
    parse_line,
    read_manifest,
)

FAST = {"select_on": "none", "shots_per_class": 1, "policy": {"max_iterations": 2}}


@pytest.fixture(scope="module")
def model_path(tiny_llama_dir):
    return str(tiny_llama_dir)


GOOD = [SST2, TREC]


@pytest.fixture
def count_builds(monkeypatch):
    """The names build_from_task was called for (in this process)."""
    calls: list[str] = []

    def counting(model, **kwargs):
        calls.append(kwargs["build_args"]["out"].rsplit("/", 1)[-1])
        return build_from_task(model, **kwargs)

    monkeypatch.setattr(manifest_workers, "build_from_task", counting)
    return calls


def test_line_fields_are_build_from_task_parameters():
    params = set(inspect.signature(build_from_task).parameters) - {"build_args", "progress"}
    # and "compress": build_compressed_from_task's settings (tests/apps/test_build_compress.py)
    assert set(BUILD_FIELDS) == params | {"compress"}


@pytest.mark.parametrize("text, message", [
    ("{\"name\": \"a\", ", "line 3: not JSON"),
    ("[1, 2]", "line 3: expected a JSON object, found list"),
    ("{\"task_dir\": \"x\"}", "line 3: \"name\" must be letters"),
    ("{\"name\": \"../up\"}", "line 3: \"name\" must be letters"),
    ("{\"name\": \"a\", \"shots\": 4}", "line 3: unknown field 'shots'"),
    ("{\"name\": \"a\", \"seed\": \"0\"}", "line 3: \"seed\" must be an integer, found '0'"),
    ("{\"name\": \"a\", \"seed\": true}", "line 3: \"seed\" must be an integer"),
    ("{\"name\": \"a\", \"optimizer\": \"adam\"}",
     "line 3: \"optimizer\" must be one of ['momentum', 'ema'], found 'adam'"),
    ("{\"name\": \"a\", \"policy\": {\"max_iterations\": 0}}",
     "line 3: \"policy\": max_iterations must be >= 1"),
    ("{\"name\": \"a\", \"policy\": {\"iterations\": 2}}",
     "line 3: policy: unknown field 'iterations'"),
])
def test_a_bad_line_names_its_line_and_field(text, message):
    with pytest.raises(ManifestError) as info:
        parse_line(text, 3, {"model": "m"}, source="tasks.jsonl")
    assert str(info.value).startswith("tasks.jsonl line 3") and message in str(info.value)


def test_manifest_checks(tmp_path):
    path = write_manifest(tmp_path / "tasks.jsonl", GOOD)
    with pytest.raises(ManifestError, match="line 1: no \"model\""):
        read_manifest(path)
    entries = read_manifest(path, {"model": "m", "seed": 5})
    assert [e.spec["seed"] for e in entries] == [0, 1]  # a line overrides the defaults
    path.write_text(path.read_text() + "\n" + json.dumps(GOOD[0]) + "\n")
    with pytest.raises(ManifestError, match="line 4: \"name\" 'sst2-s0' is already the name "
                                            "of line 1"):
        read_manifest(path, {"model": "m"})
    # null is the default, except where it means "never" (patience, collapse_drop)
    entry = parse_line(json.dumps({"name": "a", "seed": None, "policy": {"patience": None}}),
                       1, {"model": "m"})
    assert entry.spec == {"model": "m", "policy": {"patience": None}}
    assert entry.digest != parse_line('{"name": "a"}', 1, {"model": "m"}).digest
    with pytest.raises(ManifestError, match="`workers` must be >= 1"):
        build_manifest(path, tmp_path / "out", workers=0)


def test_build_skip_fail_rebuild(model_path, tmp_path, count_builds):
    store = tmp_path / "store"
    defaults = {"model": model_path, **FAST}
    manifest = write_manifest(tmp_path / "tasks.jsonl", [GOOD[0], BAD, GOOD[1]])
    first = build_manifest(manifest, store, defaults=defaults, progress=False)
    assert {r.name: r.status for r in first.results} == {
        "sst2-s0": "built", "missing": "failed", "trec-s1": "built"}
    failed = first.of("failed")[0]
    assert failed.line == 2 and "no-such-task" in failed.error and "task_dir" in failed.error
    assert not (store / "missing").exists()
    for line, name in ((1, "sst2-s0"), (3, "trec-s1")):
        config = DeepThinkAdapter.from_pretrained(store / name).config
        assert config.task["name"] == name.split("-")[0] and config.iterations_run == 2
        assert config.build_args["manifest"]["line"] == line
    written = json.loads((store / SUMMARY_NAME).read_text())
    assert written["counts"] == {"built": 2, "skipped": 0, "failed": 1}
    assert [r["name"] for r in written["results"]] == ["sst2-s0", "missing", "trec-s1"]
    assert sorted(count_builds) == ["missing", "sst2-s0", "trec-s1"]

    # Again: the finished adapters are skipped, the failed task is tried again.
    count_builds.clear()
    again = build_manifest(manifest, store, defaults=defaults, progress=False)
    assert [r.status for r in again.results] == ["skipped", "failed", "skipped"]
    assert count_builds == ["missing"]

    # A changed line is rebuilt, and so is an adapter that no longer loads.
    count_builds.clear()
    (store / "trec-s1" / "deepthink_model.safetensors").write_bytes(b"truncated")
    changed = [{**GOOD[0], "seed": 1}, GOOD[1]]
    write_manifest(manifest, changed)
    third = build_manifest(manifest, store, defaults=defaults, progress=False)
    assert sorted(count_builds) == ["sst2-s0", "trec-s1"]
    reasons = {r.name: r.reason for r in third.results}
    assert reasons["sst2-s0"] == "built from another line"
    assert reasons["trec-s1"].startswith("not loadable")
    assert DeepThinkAdapter.from_pretrained(store / "sst2-s0").config.task["seed"] == 1
    assert [r.status for r in build_manifest(manifest, store, defaults=defaults,
                                             progress=False).results] == ["skipped"] * 2

    # A rebuild that fails leaves the previous adapter as it was.
    before = (store / "sst2-s0" / "deepthink_model.safetensors").read_bytes()
    write_manifest(manifest, [{**changed[0], "task_dir": BAD["task_dir"]}])
    fourth = build_manifest(manifest, store, defaults=defaults, progress=False)
    assert [r.status for r in fourth.results] == ["failed"]
    assert (store / "sst2-s0" / "deepthink_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == [SUMMARY_NAME, "sst2-s0", "trec-s1"]


def test_a_directory_that_is_not_an_adapter_is_never_replaced(model_path, tmp_path, count_builds):
    store = tmp_path / "store"
    (store / "sst2-s0").mkdir(parents=True)
    (store / "sst2-s0" / "notes.txt").write_text("mine")
    manifest = write_manifest(tmp_path / "tasks.jsonl", GOOD[:1])
    summary = build_manifest(manifest, store, defaults={"model": model_path, **FAST},
                             progress=False)
    assert "is not an adapter directory" in summary.results[0].error
    assert (store / "sst2-s0" / "notes.txt").read_text() == "mine" and count_builds == []


@pytest.mark.ray
@pytest.mark.subprocess
def test_through_a_local_ray_instance(model_path, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra)")
    store = tmp_path / "store"
    defaults = {"model": model_path, **FAST}
    manifest = write_manifest(tmp_path / "tasks.jsonl", [GOOD[0], BAD])
    ray.init(address="local", num_cpus=1, include_dashboard=False,
             object_store_memory=80 * 1024**2, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        first = build_manifest(manifest, store, defaults=defaults, ray=True, progress=False)
        assert [r.status for r in first.results] == ["built", "failed"]
        assert first.ray and first.threads == 1  # the instance's one CPU
        assert "no-such-task" in first.results[1].error
        DeepThinkAdapter.from_pretrained(store / "sst2-s0")
        write_manifest(manifest, [GOOD[0], GOOD[1]])
        second = build_manifest(manifest, store, defaults=defaults, ray=True, progress=False)
        assert [r.status for r in second.results] == ["skipped", "built"]
        assert DeepThinkAdapter.from_pretrained(store / "trec-s1").config.task["name"] == "trec"
        assert ray.is_initialized()  # an instance the caller started is left running
    finally:
        ray.shutdown()


def test_a_model_opened_once_builds_what_a_fresh_one_builds(model_path):
    """A worker reuses its model across tasks: a build after another task equals the
    build of a freshly loaded model, to the bit."""
    from vllm_deepthink.producers.deepthink.from_task import load_base_model
    from vllm_deepthink.producers.deepthink.selection import SelectionPolicy

    policy = SelectionPolicy(max_iterations=2, min_iterations=1, guard_k=0.0)
    kwargs = {"shots_per_class": 1, "dev_size": 6, "policy": policy, "progress": False}
    base = load_base_model(model_path)
    build_from_task(base, task_dir=TREC["task_dir"], **kwargs)
    reused = build_from_task(base, task_dir=SST2["task_dir"], **kwargs)
    fresh = build_from_task(model_path, task_dir=SST2["task_dir"], **kwargs)
    def trace(adapter):  # without the seconds
        return [{k: v for k, v in e.items() if k != "dev_seconds"}
                for e in adapter.config.selection_trace]

    assert trace(reused) == trace(fresh) and len(trace(fresh)) == 2
    for ours, theirs in zip(reused.keys + reused.values, fresh.keys + fresh.values):
        assert ours.equal(theirs)
    with pytest.raises(BuildError, match="`dtype` bfloat16 differs"):
        build_from_task(base, task_dir=SST2["task_dir"], dtype="bfloat16", **kwargs)
