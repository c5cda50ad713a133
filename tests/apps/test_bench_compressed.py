"""`vllm-deepthink bench --adapter-len`: compressed adapters (k positions) beside ICL (L).

The memory bookkeeping (bytes per position, blocks per prefix, tasks that fit a KV
cache) is checked against arithmetic done here and against the adapters and the
model's own cache; the refusals without an engine; one small run on a tiny model
(2 tasks, 8 requests, L = 64, k in {16, L}, block size 32) checks the report's fields
and counters. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.tiny_models import make_tiny_model
from vllm_deepthink.apps.bench import cli
from vllm_deepthink.apps.bench.memory import (GIB, adapter_len_of, kv_bytes_per_token,
                                              memory_entry, memory_report, prefix_blocks,
                                              tasks_fitting)
from vllm_deepthink.apps.bench.processes import run_system
from vllm_deepthink.apps.bench.report import compressed_targets
from vllm_deepthink.apps.bench.run import BenchError, BenchOptions, run_benchmark

TASKS, REQUESTS, PREFIX, QUERY, BLOCK = 2, 8, 64, 32, 32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama")


# ------------------------------------------------------------------ no engine

def test_prefix_blocks_and_tasks_fitting_arithmetic():
    assert prefix_blocks(256, 16).to_dict() == {"positions": 256, "block_size": 16,
                                                "held": 16, "shared": 16, "tail": 0}
    # A prefix shorter than a block is never a shared block: all of it is tail.
    b = prefix_blocks(16, 128)
    assert (b.held, b.shared, b.tail) == (1, 0, 16)
    b = prefix_blocks(300, 128)
    assert (b.held, b.shared, b.tail) == (3, 2, 44)
    assert prefix_blocks(0, 16).held == 0
    per_token = 46080                                     # SmolLM2-135M, fp32
    blocks16 = (2 * GIB) // (16 * per_token)              # 2912 blocks of 16
    assert tasks_fitting(2 * GIB, 256, 16, per_token) == blocks16 // 16
    assert tasks_fitting(2 * GIB, 16, 16, per_token) == blocks16
    assert tasks_fitting(2 * GIB, 16, 16, per_token) // tasks_fitting(
        2 * GIB, 256, 16, per_token) == 16
    blocks128 = (2 * GIB) // (128 * per_token)            # 364 blocks of 128
    # At 128 a 16-position prefix holds a whole block, like a 128-position one.
    assert tasks_fitting(2 * GIB, 16, 128, per_token) == blocks128
    assert tasks_fitting(2 * GIB, 256, 128, per_token) == blocks128 // 2
    assert tasks_fitting(2 * GIB, 0, 16, per_token) is None
    with pytest.raises(ValueError, match="block_size"):
        prefix_blocks(16, 0)


def test_memory_entries_follow_the_helpers(tiny_llama):
    per_token = kv_bytes_per_token(tiny_llama)
    report = memory_report(["icl-apc", "icl-no-apc", "zero-shot", "deepthink-k16",
                            "deepthink-kL"], [PREFIX], per_token)
    by_system = {e["system"]: e for e in report["entries"]}
    assert set(by_system) == {"icl-apc", "zero-shot", "deepthink-k16", "deepthink-kL"}
    assert report["block_sizes"] == [16, 128] and report["kv_cache_bytes"] == 2 * GIB
    assert by_system["icl-apc"]["positions"] == PREFIX
    assert by_system["icl-apc"]["resident_bytes_per_task"] == 0
    assert by_system["deepthink-kL"]["positions"] == PREFIX
    assert by_system["zero-shot"]["kv_bytes_per_task"] == 0
    k16 = by_system["deepthink-k16"]
    assert k16["kv_bytes_per_task"] == k16["resident_bytes_per_task"] == 16 * per_token
    for entry in report["entries"]:
        for b in entry["by_block_size"]:
            blocks = prefix_blocks(entry["positions"], b["block_size"])
            assert (b["held"], b["shared"], b["tail"]) == (blocks.held, blocks.shared,
                                                            blocks.tail)
            assert b["kv_bytes_per_task"] == blocks.held * b["block_size"] * per_token
            assert b["tasks_fit"] == tasks_fitting(2 * GIB, entry["positions"],
                                                   b["block_size"], per_token)
    icl16, k16_16 = by_system["icl-apc"]["by_block_size"][0], k16["by_block_size"][0]
    assert k16_16["tasks_fit_vs_icl_apc"] == k16_16["tasks_fit"] / icl16["tasks_fit"]
    assert k16_16["tasks_fit_vs_icl_apc"] == pytest.approx(PREFIX / 16, rel=1e-3)
    assert k16["by_block_size"][1]["tasks_fit_vs_icl_apc"] == 1  # block 128: both one block
    assert memory_entry("zero-shot", PREFIX, per_token)["by_block_size"][0]["tasks_fit"] is None


def test_compressed_targets_read_ratios_and_memory():
    runs = [{"workload": {"num_tasks": 64, "prefix_len": 256, "query_len": 32,
                          "output_len": 1},
             "systems": {"deepthink-k16": {}, "deepthink-k64": {}},
             "ratios": {"deepthink-k16/zero-shot": 0.97, "deepthink-k16/icl-apc": 3.0,
                        "deepthink-k64/zero-shot": 0.5}}]
    memory = memory_report(["icl-apc", "deepthink-k16", "deepthink-k64"], [256], 46080)
    got = {t["name"]: (t["value"], t["met"]) for t in compressed_targets(runs, memory)}
    assert got == {"deepthink-k16 >= 0.95x zero-shot": (0.97, True),
                   "deepthink-k16 >= 4x icl-apc (prefix 256)": (3.0, False),
                   "deepthink-k16 >= 8x icl-apc tasks per GiB (block 16)": (16.0, True)}


def test_adapter_len_names():
    assert adapter_len_of("deepthink-k16", 256) == 16
    assert adapter_len_of("deepthink-kL", 256) == 256
    assert adapter_len_of("deepthink", 256) is None
    assert adapter_len_of("icl-apc", 256) is None


def test_refusals_say_what_to_change(tiny_llama, tmp_path, capsys):
    with pytest.raises(BenchError, match="adapter_len.*>= 1"):
        run_benchmark(BenchOptions(model=str(tiny_llama), adapter_len=[0]))
    with pytest.raises(BenchError, match="adapter_len.*>= 1"):
        run_benchmark(BenchOptions(model=str(tiny_llama), adapter_len=["M"]))
    with pytest.raises(BenchError, match=r"adapter_len` \[128\] exceeds the prefix length 64"):
        run_benchmark(BenchOptions(model=str(tiny_llama), prefix_len=[64, 256],
                                   adapter_len=[16, 128], work_dir=str(tmp_path)))
    assert not (tmp_path / "adapters").exists()   # refused before any work
    with pytest.raises(BenchError, match="twice"):
        run_benchmark(BenchOptions(model=str(tiny_llama), adapter_len=[16, 16]))
    with pytest.raises(BenchError, match="resume.*work_dir"):
        run_benchmark(BenchOptions(model=str(tiny_llama), resume=True))
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    assert parser.parse_args(["--model", "m", "--adapter-len", "16,32,L"]).adapter_len == [
        16, 32, "L"]
    for bad in ("0", "16,-1", "k", ""):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--model", "m", "--adapter-len", bad])
        assert exit_info.value.code == 2
        assert "adapter lengths >= 1" in capsys.readouterr().err


def test_resume_reuses_only_the_same_spec(tmp_path):
    spec = {"system": "nonexistent", "workloads": []}
    (tmp_path / "specs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "specs" / "deepthink-k16.json").write_text(json.dumps(spec))
    (tmp_path / "results" / "deepthink-k16.json").write_text(json.dumps({"workloads": [1]}))
    reused = run_system("deepthink-k16", spec, tmp_path, 60, {}, reuse=True)
    assert reused["reused"] and reused["workloads"] == [1]
    # A different spec runs again (here: fails, the system does not exist), and the
    # stale result is gone.
    other = run_system("deepthink-k16", dict(spec, repetitions=2), tmp_path, 120,
                       dict(os.environ), reuse=True)
    assert "error" in other
    assert not (tmp_path / "results" / "deepthink-k16.json").exists()


def test_plot_against_k(tmp_path):
    import matplotlib.image

    from vllm_deepthink.apps.bench.plot import plot_compressed

    def run(tasks, rates):
        return {"workload": {"kind": "scoring", "output_len": 1, "prefix_len": 256,
                             "num_tasks": tasks},
                "systems": {n: {"requests_per_s": r} for n, r in rates.items()}}
    report = {"settings": {"model": "m"}, "environment": {},
              "memory": memory_report(["icl-apc", "deepthink-k16", "deepthink-kL"], [256],
                                      46080),
              "runs": [run(8, {"icl-apc": 10, "zero-shot": 12, "deepthink-k16": 11,
                               "deepthink-kL": 10.5}),
                       run(64, {"icl-apc": 3, "zero-shot": 12, "deepthink-k16": 11})]}
    png = plot_compressed(report, tmp_path / "k.png")
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100
    with pytest.raises(ValueError, match="deepthink-k"):
        plot_compressed({**report, "runs": [run(8, {"icl-apc": 1})]}, tmp_path / "x.png")


# ------------------------------------------------------------------ one small run

@pytest.fixture(scope="module")
def compressed_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-k")
    cmd = [sys.executable, "-m", "vllm_deepthink.apps.cli", "bench", "--model", str(tiny_llama),
           "--tasks", str(TASKS), "--requests", str(REQUESTS), "--prefix-len", str(PREFIX),
           "--query-len", str(QUERY), "--output-len", "1", "--repetitions", "1",
           "--warmup-requests", "4", "--systems", "icl-apc,zero-shot", "--adapter-len", "16,L",
           "--block-size", str(BLOCK), "--builder-iterations", "0",
           "--work-dir", str(out / "work"), "--output-json", str(out / "bench.json"),
           "--plot", str(out / "bench.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.engine
def test_compressed_run_fields_and_counters(compressed_run, tiny_llama):
    from vllm_deepthink.format import DeepThinkAdapter

    report, out = compressed_run
    assert (out / "bench.png").is_file()
    assert report["systems_done"] == ["icl-apc", "zero-shot", "deepthink-k16", "deepthink-kL"]
    assert report["settings"]["adapter_len"] == [16, "L"]
    env = report["environment"]
    assert "load average" in env["uptime_start"] and "load average" in env["uptime_end"]
    (run,) = report["runs"]
    systems = run["systems"]
    for name, fig in systems.items():
        assert "error" not in fig, fig.get("error")
        assert fig["requests_per_s"] > 0 and fig["block_size"] == BLOCK
    k16, kl = systems["deepthink-k16"], systems["deepthink-kL"]
    assert (k16["adapter_len"], kl["adapter_len"]) == (16, PREFIX)
    # Both stand for the L demonstration tokens; only the query is computed.
    for fig in (k16, kl):
        assert fig["prompt_tokens_submitted"] == REQUESTS * (PREFIX + QUERY)
        assert fig["prompt_tokens_computed"] == REQUESTS * QUERY
    # k = 16 < block 32: never a shared block, every request loads its adapter.
    assert k16["adapter_loads"] == REQUESTS
    assert k16["prompt_tokens_external_loaded"] == REQUESTS * 16
    assert k16["prompt_tokens_local_cache_hit"] == 0
    # k = L = 64: two full blocks, loaded once per task (or per request scheduled in the
    # same step), then hit.
    assert TASKS <= kl["adapter_loads"] <= REQUESTS
    assert kl["prompt_tokens_external_loaded"] == kl["adapter_loads"] * PREFIX
    for name in ("deepthink-k16", "deepthink-kL"):
        for other in ("icl-apc", "zero-shot"):
            assert run["ratios"][f"{name}/{other}"] == pytest.approx(
                systems[name]["requests_per_s"] / systems[other]["requests_per_s"])
    # The memory section: the resident bytes are the synthetic adapters' own K/V bytes.
    by_system = {e["system"]: e for e in report["memory"]["entries"]}
    for name, k in (("deepthink-k16", 16), ("deepthink-kL", PREFIX)):
        adapter = DeepThinkAdapter.from_pretrained(out / "work" / "adapters" / f"k{k}" / "a00001")
        assert adapter.config.prefix_len == k
        assert by_system[name]["resident_bytes_per_task"] == adapter.config.kv_bytes()
    model_cache = _hf_kv_bytes_per_token(tiny_llama)
    assert report["memory"]["bytes_per_token"] == model_cache
    assert {t["name"] for t in report["targets"]} >= {
        "deepthink-k16 >= 8x icl-apc tasks per GiB (block 16)"}


def _hf_kv_bytes_per_token(model_dir) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 // 3
