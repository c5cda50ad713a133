"""`vllm-deepthink bench` on a tiny model: JSON shape, PNG, and deepthink == icl-apc outputs.

One small benchmark run (2 tasks, 8 requests, prefix 64, output 1 and 2 tokens:
two workloads in one process per system, 1 repetition; server mode: 4 requests per
workload through `vllm bench serve`) is shared by the module. Block size 32 makes the
64-token prefix two full blocks, so icl-apc really reuses cached demo blocks and
deepthink shares adapter blocks. No timing is asserted: only shapes, consistency of the
counts, and outputs.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.tiny_models import make_tiny_model
from vllm_deepthink.apps.bench.report import targets, task_scaling
from vllm_deepthink.apps.bench.run import (BenchError, BenchOptions, auto_kv_cache_gib,
                                           kv_bytes_per_token, run_benchmark)
from vllm_deepthink.apps.processes import AdminCallError, Server, engine_env, free_port
from vllm_deepthink.apps.bench.server_bench import prompts, round_robin_order
from vllm_deepthink.apps.bench.workload import Workload, clip_prefix_len, make_request_set

SYSTEMS = ["deepthink", "icl-apc", "hf-reference"]
TASKS, REQUESTS, PREFIX, QUERY = 2, 8, 64, 32
SERVER_REQUESTS = 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama")


@pytest.fixture(scope="module")
def bench_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "vllm_deepthink.apps.cli", "bench", "--model", str(tiny_llama),
           "--tasks", str(TASKS), "--requests", str(REQUESTS), "--prefix-len", str(PREFIX),
           "--query-len", str(QUERY), "--output-len", "1,2", "--repetitions", "1",
           "--warmup-requests", "4", "--systems", ",".join(SYSTEMS), "--block-size", "32",
           "--hf-batch-sizes", "4", "--builder-iterations", "2", "--record-logprobs",
           "--save-outputs", "--work-dir", str(out / "work"),
           "--output-json", str(out / "bench.json"), "--plot", str(out / "bench.png"),
           "--server", "--server-requests", str(SERVER_REQUESTS), "--request-rate", "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out / "bench.png"


# ------------------------------------------------------------------ no engine

def test_workload_is_deterministic_and_well_shaped(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    w = Workload(num_tasks=3, prefix_len=40, query_len=7, output_len=1, num_requests=10)
    a, b = make_request_set(tok, w, seed=1), make_request_set(tok, w, seed=1)
    assert (a.demos, a.task_of, a.queries) == (b.demos, b.task_of, b.queries)
    assert [len(d) for d in a.demos] == [40] * 3
    assert all(d[0] == tok.bos_token_id for d in a.demos)
    assert all(len(q) == 7 and tok.bos_token_id not in q for q in a.queries)
    assert sorted(a.task_of) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(d) for d in a.demos}) == 3
    warm = make_request_set(tok, w, seed=1, query_seed_offset=1)
    assert warm.demos == a.demos and warm.queries != a.queries


def test_workload_from_task_dir_uses_the_tasks_templates(tiny_llama):
    """The shipped SST-2 task (tasks.load_task): demos in its template, BOS first."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    w = Workload(num_tasks=2, prefix_len=150, query_len=9, output_len=1, num_requests=4)
    rs = make_request_set(tok, w, seed=0, task_dir=REPO_ROOT / "examples" / "data" / "sst2")
    assert [len(d) for d in rs.demos] == [150, 150] and rs.demos[0] != rs.demos[1]
    assert all(d[0] == tok.bos_token_id for d in rs.demos)
    assert [len(q) for q in rs.queries] == [9] * 4
    demos = tok.decode(rs.demos[0])
    assert "Review: " in demos and "\nSentiment: " in demos
    with pytest.raises(ValueError, match="fewer than the prefix length"):
        make_request_set(tok, Workload(1, 10**6, 9, 1, 4), task_dir=REPO_ROOT / "examples"
                         / "data" / "sst2")


def test_server_prompts_are_text_that_reproduces_the_offline_ids(tiny_llama):
    """vllm bench serve sends text: synthetic prompts decode to text that tokenizes back
    to the same ids, in the order round-robin adapter names need (request j: task j % T)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    w = Workload(num_tasks=3, prefix_len=40, query_len=7, output_len=1, num_requests=10)
    rs = make_request_set(tok, w, seed=1)
    order = round_robin_order(rs.task_of, 3)
    assert sorted(order) == list(range(10))
    assert [rs.task_of[i] for i in order] == [j % 3 for j in range(10)]
    for system in ("icl-apc", "deepthink"):
        texts, reproduced = prompts(tok, system, rs, 3, 5)
        assert len(texts) == 5 and reproduced == 1.0
    icl, _ = prompts(tok, "icl-apc", rs, 3, 5)
    assert tok.encode(icl[1], add_special_tokens=False) == rs.demos[1] + rs.queries[order[1]]
    with pytest.raises(ValueError, match="round-robin"):
        round_robin_order([0, 0, 0, 1], 2)


def test_t1_adapters_are_the_models_kv_of_the_demo_ids(tiny_llama, tmp_path):
    """The builder's first iteration over the demo ids themselves: plain ICL K/V."""
    from vllm_deepthink.apps.bench.adapters import build_t1_adapters, load_hf_model
    from vllm_deepthink.format import DeepThinkAdapter

    model, tok = load_hf_model(tiny_llama)
    demos = make_request_set(tok, Workload(2, 24, 4, 1, 2), seed=3).demos
    paths = build_t1_adapters(model, tok, tiny_llama, demos, tmp_path)
    assert [p.name for p in paths] == ["task0", "task1"]
    for ids, path in zip(demos, paths):
        adapter = DeepThinkAdapter.from_pretrained(path)
        assert adapter.config.demo_token_ids == ids and adapter.config.prefix_len == 24
        assert adapter.config.selected_iteration == 1
        with torch.no_grad():
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        for layer, keys, values in zip(cache.layers, adapter.keys, adapter.values):
            torch.testing.assert_close(keys, layer.keys[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(values, layer.values[0], rtol=0, atol=1e-6)


def test_clip_prefix_len():
    assert clip_prefix_len(1024, 32, 32, 512) == 448
    assert clip_prefix_len(64, 32, 1, 2048) == 64
    with pytest.raises(ValueError, match="no room"):
        clip_prefix_len(64, 300, 300, 512)


@pytest.mark.subprocess
def test_bad_options_say_what_to_change(tmp_path, tiny_llama):
    with pytest.raises(BenchError, match="expected a local HF model directory"):
        run_benchmark(BenchOptions(model=str(tmp_path / "nowhere")))
    with pytest.raises(BenchError, match="`request_rate` must be > 0"):
        run_benchmark(BenchOptions(model=str(tiny_llama), request_rate=0))
    proc = subprocess.run([sys.executable, "-m", "vllm_deepthink.apps.cli", "bench", "--model",
                           str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "expected a local HF model directory" in proc.stderr
    assert "vllm-deepthink bench: error: --model " in proc.stderr  # the flag, not `model`


def test_engine_env_is_the_one_engine_environment(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    env = engine_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    env = engine_env(3, 1, VLLM_SERVER_DEV_MODE="1")
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_NUM_OF_RESERVED_CPU"],
            env["VLLM_SERVER_DEV_MODE"]) == ("3", "1", "1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert engine_env()["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_a_failing_admin_call_raises_with_status_and_body(tmp_path):
    """POST /reset_prefix_cache against a stand-in server: 500, then 200 with
    success=false (vLLM's answer while blocks are held), then success; and nobody."""
    answer = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            status, body = answer[self.path]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = Server("model", log_path=tmp_path / "log", port=httpd.server_port)
        answer["/reset_prefix_cache"] = (500, b'{"error": "engine dead"}')
        with pytest.raises(AdminCallError, match="expected HTTP 200, found 500.*engine dead"):
            server.reset_prefix_cache()
        answer["/reset_prefix_cache"] = (200, b'{"success": false}')
        with pytest.raises(AdminCallError, match='found {"success": false}'):
            server.reset_prefix_cache()
        answer["/reset_prefix_cache"] = (200, b'{"success": true}')
        server.reset_prefix_cache()
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(AdminCallError, match="no answer"):
        Server("model", log_path=tmp_path / "log", port=free_port()).reset_prefix_cache()


def test_targets_flag_misses_and_scaling():
    def run(tasks, dt, apc):
        return {"workload": {"num_tasks": tasks, "prefix_len": 256, "query_len": 32,
                             "output_len": 1},
                "systems": {"deepthink": {"requests_per_s": dt}},
                "ratios": {"deepthink/icl-apc": dt / apc, "deepthink/icl-no-apc": dt / apc * 3}}
    runs = [run(1, 10.0, 10.0), run(64, 7.0, 10.0)]
    scaling = task_scaling(runs)
    assert scaling == [{"system": "deepthink", "prefix_len": 256, "query_len": 32,
                        "output_len": 1, "tasks_low": 1, "tasks_high": 64, "ratio": 0.7}]
    met = {(t["name"], t["workload"]): t["met"] for t in targets(runs, scaling)}
    assert met[("deepthink >= 0.95x icl-apc", "tasks=1 prefix=256 query=32 out=1")]
    assert not met[("deepthink >= 0.95x icl-apc", "tasks=64 prefix=256 query=32 out=1")]
    assert not met[("deepthink tasks=64 >= 0.8x tasks=1", "prefix=256 query=32 out=1")]
    assert sum(name.startswith("deepthink >= 2x") for name, _ in met) == 2


# ------------------------------------------------------------------ one small run

@pytest.mark.engine
def test_json_is_well_formed(bench_run):
    report, _ = bench_run
    assert report["schema_version"] == 1
    env = report["environment"]
    assert env["cpu_model"] and env["logical_cpus"] >= 1 and env["vllm_version"]
    assert [r["workload"]["output_len"] for r in report["runs"]] == [1, 2]
    generation = report["runs"][1]
    for name, fig in generation["systems"].items():
        assert "error" not in fig, fig.get("error")
        assert all(len(ids) == 2 for ids in fig["output_token_ids"]), name
    run = report["runs"][0]
    assert run["workload"] == {"num_tasks": TASKS, "prefix_len": PREFIX, "query_len": QUERY,
                               "output_len": 1, "num_requests": REQUESTS, "kind": "scoring"}
    assert set(run["systems"]) == set(SYSTEMS)
    for name, fig in run["systems"].items():
        assert "error" not in fig, fig.get("error")
        assert fig["requests_per_s"] > 0 and fig["output_tokens_per_s"] > 0
        assert 0 < fig["latency_p50_s"] <= fig["latency_p99_s"]
        assert fig["peak_rss_bytes"] > 0
        assert fig["prompt_tokens_submitted"] == REQUESTS * (PREFIX + QUERY)
        assert len(fig["repetitions"]) == 1
        assert len(fig["output_token_ids"]) == REQUESTS
        assert all(len(ids) == 1 for ids in fig["output_token_ids"])
    apc = run["systems"]["icl-apc"]
    # The warm-up is excluded and the cache emptied before the pass: each task's two
    # demo blocks are computed once, then hit by the task's other requests.
    assert apc["prompt_tokens_local_cache_hit"] == (REQUESTS - TASKS) * PREFIX
    assert apc["prompt_tokens_computed"] == REQUESTS * (PREFIX + QUERY) - (REQUESTS - TASKS) * PREFIX
    assert apc["block_size"] == 32
    # Requests of a task scheduled in one step may each load its adapter; later
    # ones hit the cached blocks. Each load writes the whole (block-aligned) prefix.
    dt = run["systems"]["deepthink"]
    assert TASKS <= dt["adapter_loads"] <= REQUESTS
    assert dt["prompt_tokens_external_loaded"] == dt["adapter_loads"] * PREFIX
    # The plugin's own time over the pass: every adapter request rewritten and trimmed
    # (frontend, output), the scheduler and workers counted per step too.
    (rep,) = dt["repetitions"]
    cost = rep["plugin_cost"]
    assert cost["frontend"]["requests"] == REQUESTS == cost["output"]["requests"]
    assert cost["scheduler"]["steps"] > 0 and cost["worker"]["microseconds"] > 0
    assert dt["plugin_us_per_request"] == pytest.approx(sum(
        p["microseconds"] for name, p in cost.items() if name != "worker_read") / REQUESTS)
    assert apc["plugin_us_per_request"] is None
    hf = run["systems"]["hf-reference"]
    assert hf["prompt_tokens_computed"] == REQUESTS * QUERY and hf["batch_size"] == 4
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    (cost,) = report["builder_cost"]
    assert cost["prefix_len"] == PREFIX and cost["iteration_s"] > 0
    assert cost["plain_forward_2l_s"] > 0


@pytest.mark.engine
def test_png_is_written(bench_run):
    import matplotlib.image

    _, png = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100


@pytest.mark.engine
def test_icl_outputs_equal_hf_full_prompt(bench_run, tiny_llama):
    """Ground truth: greedy token of the HF model on demo ids + query ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report, _ = bench_run
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rs = make_request_set(tok, Workload(TASKS, PREFIX, QUERY, 1, REQUESTS), seed=0)
    systems = report["runs"][0]["systems"]
    with torch.no_grad():
        for i, (task, query) in enumerate(zip(rs.task_of, rs.queries)):
            logits = model(torch.tensor([rs.demos[task] + query])).logits[0, -1]
            expected = int(logits.argmax())
            assert systems["icl-apc"]["output_token_ids"][i] == [expected]
            assert systems["hf-reference"]["output_token_ids"][i] == [expected]
            expected_lp = float(torch.log_softmax(logits, -1)[expected])
            assert systems["icl-apc"]["output_logprobs"][i][0] == pytest.approx(expected_lp, abs=1e-3)
            assert systems["hf-reference"]["output_logprobs"][i][0] == pytest.approx(
                expected_lp, abs=1e-4)


@pytest.mark.engine
def test_deepthink_outputs_equal_icl_apc(bench_run):
    report, _ = bench_run
    run = report["runs"][0]
    dt, apc = run["systems"]["deepthink"], run["systems"]["icl-apc"]
    assert dt["output_token_ids"] == apc["output_token_ids"]
    for a, b in zip(dt["output_logprobs"], apc["output_logprobs"]):
        assert a[0] == pytest.approx(b[0], abs=1e-3)
    assert run["outputs_match"]["deepthink==icl-apc"] == 1.0
    assert dt["prompt_tokens_computed"] == REQUESTS * QUERY


@pytest.mark.engine
def test_server_mode_is_vllm_bench_serve_against_each_vllm_system(bench_run):
    report, _ = bench_run
    server = report["server"]
    assert server["client"] == "vllm bench serve"
    assert [r["workload"]["output_len"] for r in server["runs"]] == [1, 2]
    n = SERVER_REQUESTS
    for run in server["runs"]:
        out = run["workload"]["output_len"]
        assert set(run["systems"]) == set(SYSTEMS) - {"hf-reference"}
        for name, fig in run["systems"].items():
            assert "error" not in fig, fig.get("error")
            assert (fig["completed"], fig["failed"], fig["errors"]) == (n, 0, []), name
            assert fig["total_output_tokens"] == n * out
            assert fig["prompt_ids_reproduced"] == 1.0
            assert 0 < fig["p50_ttft_ms"] <= fig["p99_ttft_ms"]
            assert fig["median_ttft_ms"] <= fig["median_e2el_ms"]
            assert fig["command"].startswith("vllm bench serve ")
            saved = json.loads(Path(fig["result_file"]).read_text())  # vLLM's result JSON
            assert (saved["completed"], saved["request_rate"], saved["burstiness"]) == (
                n, 20.0, 1.0)
            assert len(saved["ttfts"]) == n
        dt, apc = run["systems"]["deepthink"], run["systems"]["icl-apc"]
        # The server's prompt tokens: demos + query for icl-apc (the text prompts are the
        # offline ids), the query alone for deepthink (the adapter stands for the demos).
        assert apc["total_input_tokens"] == n * (PREFIX + QUERY)
        assert dt["total_input_tokens"] == n * QUERY
        assert "--lora-modules p64-task0 p64-task1 --lora-assignment round-robin" in dt["command"]
        assert "--lora-modules" not in apc["command"]
        assert TASKS <= dt["adapter_loads"] <= n and apc["adapter_loads"] is None
        # Each request reached its own task's adapter: the same text as with its demos.
        assert run["outputs_match"] == {"deepthink==icl-apc": 1.0}


def test_plot_of_several_reports_merges_their_runs(tmp_path):
    """`python -m vllm_deepthink.apps.bench.plot a.json b.json`: one panel per (kind, prefix)."""
    import matplotlib.image

    def report(prefix, tasks, rates):
        return {"settings": {"model": "m"}, "environment": {},
                "runs": [{"workload": {"kind": "scoring", "output_len": 1, "prefix_len": prefix,
                                       "num_tasks": tasks},
                          "systems": {name: {"requests_per_s": r} for name, r in rates.items()}}]}

    paths = []
    for i, rep in enumerate([report(64, 8, {"icl-apc": 2.0, "deepthink": 5.0}),
                             report(256, 8, {"icl-apc": 1.0, "icl-no-apc": 0.2})]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(rep))
    png = tmp_path / "all.png"
    proc = subprocess.run([sys.executable, "-m", "vllm_deepthink.apps.bench.plot", *map(str, paths),
                           "--out", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100  # two panels side by side

    (tmp_path / "bad.json").write_text(json.dumps(report(64, 8, {"deepthink": 5.0})))
    proc = subprocess.run([sys.executable, "-m", "vllm_deepthink.apps.bench.plot",
                           str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "icl-apc" in proc.stderr


def test_kv_bytes_per_token_matches_the_models_cache(tiny_llama):
    """The auto-sized KV cache counts exactly the K/V bytes HF caches per token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    per_token = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 // 3
    assert kv_bytes_per_token(tiny_llama) == per_token
    w = Workload(num_tasks=64, prefix_len=1024, query_len=32, output_len=1, num_requests=8)
    assert auto_kv_cache_gib([w], 1 << 20) == 1 + 64
