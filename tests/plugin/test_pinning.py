"""Pinning without an engine: the residency plan (pinned adapters never evicted, counted,
other reads in the room they leave), the rule admitting a pinned set, the scheduler and
worker sides, the three ways to pin (--deepthink-pin, "pin": true, engine_args(pin=)),
and the /v1/models card and runtime refusals."""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.plugin.connector.residency import Footprint, ResidencyPlan, pin_set_error

D = {name: name * 64 for name in "abcdef"}  # digests
ONE = Footprint(resident=20, peak=30)


# ---------------------------------------------------------------- the plan

def test_pinned_adapter_is_never_evicted_while_round_robin_evicts_the_others():
    # Room for the pinned copy, one read, and one more resident copy.
    plan = ResidencyPlan(budget=ONE.resident + ONE.total + ONE.resident)
    plan.pin(D["f"], ONE)
    assert plan.is_resident(D["f"]) and plan.is_pinned(D["f"])
    assert plan.pinned_bytes() == 20 and plan.room() == plan.budget - 20
    evicted = []
    for _ in range(3):
        for name in "abcd":
            assert plan.can_start(ONE)
            evicted += plan.start(D[name], ONE)
            assert plan.used() <= plan.budget
            assert plan.report(D[name], 1, 0) is True
            plan.end_step()
    # The pinned adapter is the least recently used all along, yet never chosen.
    assert D["f"] not in evicted and len(evicted) >= 8
    assert set(evicted) <= {D[n] for n in "abcd"}
    assert plan.is_resident(D["f"]) and plan.resident()[0] == D["f"]


def test_a_read_that_fits_only_by_evicting_a_pinned_adapter_waits_forever():
    plan = ResidencyPlan(budget=ONE.resident + ONE.total - 1)
    plan.pin(D["f"], ONE)
    assert not plan.can_start(ONE)  # evicting p would make room: never done
    plan.hit(D["f"])
    plan.end_step()
    assert not plan.can_start(ONE) and plan.is_resident(D["f"])


def test_pins_count_against_the_budget():
    plan = ResidencyPlan(budget=100)
    plan.pin(D["f"], Footprint(30, 60))
    plan.pin(D["e"], Footprint(10, 20))
    assert plan.used() == 40 and plan.pinned_bytes() == 40 and plan.room() == 60
    assert plan.can_start(Footprint(20, 40)) and not plan.can_start(Footprint(21, 40))


# ---------------------------------------------------------------- the rule

def test_pin_set_rule_counts_resident_copies_and_the_largest_read():
    pinned = {"p": Footprint(30, 60), "q": Footprint(10, 20)}
    others = {"a": Footprint(20, 40)}
    # Resident 40, the largest read is p's peak at start (60): 100.
    assert pin_set_error(pinned, others, 100) is None
    message = pin_set_error(pinned, others, 99)
    assert "the pinned adapters (p, q) need 40 bytes" in message
    assert "'p': 60 bytes of transient peak" in message and "100 bytes" in message
    assert "budget of 99 bytes" in message and "--deepthink-resident-gib" in message
    # An unpinned adapter's read (copy and peak) beside the pinned set.
    others["big"] = Footprint(30, 50)
    assert pin_set_error(pinned, others, 119) is not None
    assert "'big': 80 bytes, copy and peak" in pin_set_error(pinned, others, 119)
    assert pin_set_error(pinned, others, 120) is None


# ---------------------------------------------------------------- scheduler side

vllm = pytest.importorskip("vllm")

from tests.plugin.test_async_loads import SHAPE, admit, request, step_output  # noqa: E402
from vllm_deepthink.plugin.connector.pins import PinnedSet, agreed_pins  # noqa: E402
from vllm_deepthink.plugin.connector.scheduler import (  # noqa: E402
    DeepThinkWorkerMetadata,
    SchedulerSide,
)

L = 40


def test_a_pinned_adapter_is_a_hit_from_the_first_request_and_never_evicted():
    one = SHAPE.footprint(L)
    side = SchedulerSide(block_size=32, budget=one.resident + one.total, shape=SHAPE)
    side.pin("ad-f", D["f"], L)
    assert admit(side, request("r0", D["f"])) == (L, False)  # resident since start
    side.build_connector_meta(step_output(["r0"]))
    evicted = []
    for i, name in enumerate("abcabc"):
        assert admit(side, request(f"r{i + 1}", D[name])) == (L, True)
        evicted += side.build_connector_meta(step_output()).evict
        side.update_connector_output(DeepThinkWorkerMetadata(reads={D[name]: [1, 0]}))
        assert admit(side, request(f"h{i}", D["f"])) == (L, False)
        side.build_connector_meta(step_output([f"h{i}"]))
    assert evicted == [D[n] for n in "abcab"]  # each read evicts the previous one
    stats = side.take_stats()
    assert stats.data["reads"] == {"ad-f": 1, "ad-a": 2, "ad-b": 2, "ad-c": 2}
    assert stats.data["loads"]["ad-f"] == 7


def test_an_adapter_that_fits_the_budget_but_not_beside_the_pins_is_refused():
    one = SHAPE.footprint(L)
    side = SchedulerSide(block_size=32, budget=one.total + 10, shape=SHAPE)
    side.pin("ad-f", D["f"], L)
    assert admit(side, request("r1", D["a"])) == (L, True)
    (load,) = side.build_connector_meta(step_output()).loads
    assert "beside the pinned adapters" in load.refused and "pin fewer" in load.refused


def test_the_ranks_must_agree_on_what_they_pinned():
    a = PinnedSet({"p": (D["f"], L)})
    assert agreed_pins({0: a, 1: PinnedSet({"p": (D["f"], L)})}) == {"p": (D["f"], L)}
    assert agreed_pins({}) == {}
    with pytest.raises(ValueError, match="files changed while the engine started"):
        agreed_pins({0: a, 1: PinnedSet({"p": (D["e"], L)})})
    with pytest.raises(ValueError, match="different pinned adapters"):
        agreed_pins({0: a, 1: None})


# ---------------------------------------------------------------- worker side

from vllm_deepthink.plugin.connector import pins  # noqa: E402
from vllm_deepthink.plugin.connector.resident import ResidentAdapters  # noqa: E402
from vllm_deepthink.plugin.connector.worker import WorkerSide  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    model, tokenizer = load_tiny("llama", tiny_llama_dir)
    built = {name: noisy_adapter(model, tokenizer, root / name, L, seed=n, offset=n)
             for n, name in enumerate("abc")}
    return root, built


def fake_vllm_config(adapters_root, built, pinned, budget_bytes):
    fp = next(iter(built.values())).config.fingerprint
    model = SimpleNamespace(get_num_layers=lambda p: fp.num_layers,
                            get_total_num_kv_heads=lambda: fp.num_kv_heads,
                            get_num_kv_heads=lambda p: fp.num_kv_heads,
                            get_head_size=lambda: fp.head_dim, dtype=torch.float32)
    extra = {"adapters": {n: str(adapters_root / n) for n in built}, "pinned": pinned,
             "resident_gib": budget_bytes / (1 << 30)}
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(),
                           kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))


def test_engine_start_refuses_a_pinned_set_the_budget_cannot_hold(adapters):
    root, built = adapters
    fp = built["a"].config.fingerprint
    one = pins.ModelShape(fp.num_layers, fp.num_kv_heads, fp.num_kv_heads, fp.head_dim,
                          4).footprint(L)
    enough = 2 * one.resident + one.total  # a and b pinned, c read beside them
    config = fake_vllm_config(root, built, ["a", "b"], enough)
    assert pins.check_pin_set(config) == {"a": str(root / "a"), "b": str(root / "b")}
    config = fake_vllm_config(root, built, ["a", "b"], enough - 1024)
    with pytest.raises(ValueError) as info:
        pins.check_pin_set(config)
    assert f"need {2 * one.resident} bytes" in str(info.value)
    assert "('c':" in str(info.value) and "budget of" in str(info.value)
    with pytest.raises(ValueError, match=r"pinned adapters \['x'\] are not served from"):
        pins.check_pin_set(fake_vllm_config(root, built, ["x"], enough))


def test_workers_read_pinned_adapters_at_start_and_report_their_digests(adapters, tmp_path):
    root, built = adapters
    side = WorkerSide.__new__(WorkerSide)
    side._start(ResidentAdapters(torch.float32, 1, 0), block_size=32)
    pinned = side.read_pins({"a": str(root / "a"), "b": str(root / "b")})
    assert pinned.adapters == {n: (built[n].digest, L) for n in "ab"}
    assert set(side.store.digests()) == {built["a"].digest, built["b"].digest}
    with pytest.raises(ValueError, match="cannot start: pinned adapter 'x'"):
        side.read_pins({"x": str(tmp_path / "missing")})
    side.shutdown()


# ---------------------------------------------------------------- the three forms

from vllm_deepthink.plugin.api import engine_args  # noqa: E402
from vllm_deepthink.plugin.serving import flags  # noqa: E402


def parse(argv):
    return flags.add_cli_args(argparse.ArgumentParser(exit_on_error=False)).parse_args(argv)


def test_pin_flag_and_json_pin_name_adapters_served_from_start():
    args = parse(["--deepthink-adapter", "a=/x/a",
                  "--deepthink-adapter", json.dumps({"name": "b", "path": "/x/b", "pin": True}),
                  "--deepthink-adapter", json.dumps({"name": "c", "path": "/x/c", "pin": False}),
                  "--deepthink-pin", "a", "b"])
    adapters = flags.adapters_from_args(args)
    assert flags.pins_from_args(args, adapters) == ["b", "a"]
    assert flags.pins_from_args(parse(["--deepthink-adapter", "a=/x/a"]), {"a": "/x/a"}) == []


@pytest.mark.parametrize("argv,reason", [
    (["--deepthink-pin", "../a"], "a name is never a path"),
    (["--deepthink-pin"], "expected at least one argument"),
    (["--deepthink-adapter", '{"name": "a", "path": "/x", "pin": "yes"}'],
     "pin must be true or false"),
    (["--deepthink-adapter", '{"name": "a", "path": "/x", "pinned": true}'],
     r"unknown keys \['pinned'\]"),
])
def test_bad_pins_are_refused_by_the_parser(argv, reason):
    with pytest.raises(argparse.ArgumentError, match=reason):
        parse(argv)


def test_a_pin_must_name_an_adapter_served_from_start():
    args = parse(["--deepthink-adapter", "a=/x/a", "--deepthink-pin", "b"])
    with pytest.raises(ValueError, match="--deepthink-pin: no adapter named 'b' is served"):
        flags.pins_from_args(args, flags.adapters_from_args(args))
    with pytest.raises(ValueError, match="--deepthink-pin needs adapters to serve"):
        flags.apply_adapter_args(SimpleNamespace(), parse(["--deepthink-pin", "b"]))


def test_engine_args_pin_reaches_the_connector_configuration(adapters):
    root, _ = adapters
    paths = {n: root / n for n in "abc"}
    kwargs = engine_args(paths, pin=["a", "b", "a"])
    extra = kwargs["kv_transfer_config"].kv_connector_extra_config
    assert extra["pinned"] == ["a", "b"]
    assert "pinned" not in engine_args(paths)["kv_transfer_config"].kv_connector_extra_config
    # A caller's own kv_transfer_config: its pins and pin= are merged.
    merged = engine_args(paths, pin=["c"], kv_transfer_config=kwargs["kv_transfer_config"])
    assert merged["kv_transfer_config"].kv_connector_extra_config["pinned"] == ["a", "b", "c"]


@pytest.mark.parametrize("pin,error,reason", [
    ("a", TypeError, r"pin must be a list of adapter names \(e.g. pin=\[\"sst2\"\]\)"),
    (["../a"], ValueError, "a name is never a path"),
    (["zz"], ValueError, r"pinned adapters \['zz'\] are not served from engine start"),
])
def test_engine_args_refuses_bad_pins(adapters, pin, error, reason):
    root, _ = adapters
    with pytest.raises(error, match=reason):
        engine_args({n: root / n for n in "abc"}, pin=pin)


# ---------------------------------------------------------------- /v1/models, runtime

from vllm_deepthink.plugin import protocol  # noqa: E402
from vllm_deepthink.plugin.serving import models as serving_models  # noqa: E402


@pytest.fixture
def served(monkeypatch):
    infos = {n: SimpleNamespace(name=n, digest=D[n], prefix_len=L, parent=None) for n in "ab"}
    registry = SimpleNamespace(names=lambda: list(infos), current=infos.get,
                               infos=lambda: list(infos.values()), unregister=infos.pop)
    monkeypatch.setattr(serving_models, "registry_of", lambda models: registry)
    extra = {"adapters": {n: "/x/" + n for n in "ab"}, "pinned": ["a"]}
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
    return SimpleNamespace(engine_client=SimpleNamespace(vllm_config=vllm_config),
                           base_model_paths=[SimpleNamespace(name="base")],
                           model_config=SimpleNamespace(max_model_len=256),
                           is_base_model=lambda name: False, lora_requests={}), infos


def test_models_cards_say_which_adapters_are_pinned(served):
    models, _ = served
    cards = {c.id: c.model_dump() for c in serving_models.model_cards(models)}
    assert cards["a"]["pinned"] is True and cards["b"]["pinned"] is False


def test_a_pinned_adapter_cannot_be_unloaded_or_replaced_at_runtime(served):
    models, infos = served
    for coro in (serving_models.unload_adapter(models, "a"),
                 serving_models.load_adapter(models, "a", "/y/a", replace=True)):
        response = asyncio.run(coro)
        assert response.error.code == 400 and "is pinned" in response.error.message
    assert "a" in infos
    assert "Success" in asyncio.run(serving_models.unload_adapter(models, "b"))
    assert protocol.pinned_change_error("a") in response.error.message
