"""`vllm-deepthink bench --scale` on a tiny model: the Zipf workload, the synthetic adapters,
and the bookkeeping of one small run (3 adapters, 8 requests, deepthink only, one server
start); then the same command again, which resumes from the JSON without starting a server.
No timing is asserted: only that the figures are present and consistent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_model
from vllm_deepthink.apps.bench.scale import (ScaleError, ScaleOptions, derived,
                                             request_prompts, run_scale)
from vllm_deepthink.apps.bench.scale_workload import (adapter_dir_of, adapter_label,
                                                      scale_requests,
                                                      write_synthetic_adapters, zipf_weights)

N, REQUESTS, PREFIX, QUERY, OUTPUT = 3, 8, 64, 8, 2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.getbasetemp() / "tiny-llama")


# ------------------------------------------------------------------ no engine

def test_zipf_weights():
    w = zipf_weights(5, 1.1)
    assert sum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(w, w[1:]))
    assert w[0] / w[1] == pytest.approx(2 ** 1.1)
    assert zipf_weights(4, 0.0) == [0.25] * 4
    with pytest.raises(ValueError, match="`count` must be >= 1"):
        zipf_weights(0, 1.1)


def test_zipf_requests_are_deterministic_with_the_right_support():
    a = scale_requests(16, 400, zipf_s=1.1, plain_share=0.1, seed=3)
    assert a == scale_requests(16, 400, zipf_s=1.1, plain_share=0.1, seed=3)
    assert a != scale_requests(16, 400, zipf_s=1.1, plain_share=0.1, seed=4)
    assert a != scale_requests(16, 400, zipf_s=1.1, plain_share=0.1, seed=3, stream="warmup")
    assert len(a) == 400 and a.count(None) == 40
    picks = [p for p in a if p is not None]
    assert set(picks) <= set(range(16))
    counts = Counter(picks)
    assert counts.most_common(1)[0][0] == 0          # the head of the law
    assert counts[0] > counts.get(8, 0) + counts.get(15, 0)
    assert None not in scale_requests(4, 10, zipf_s=1.1, plain_share=0.0)
    assert scale_requests(4, 10, zipf_s=1.1, plain_share=1.0) == [None] * 10
    with pytest.raises(ValueError, match="`plain_share` must be in"):
        scale_requests(4, 10, zipf_s=1.1, plain_share=1.5)


def test_derived_rates():
    fig = {"adapter_loads": 8.0, "adapter_reads": 2.0, "prefix_cache_queries": 100.0,
           "prefix_cache_hits": 25.0, "duration": 2.0}
    assert derived(fig) == {"resident_hit_rate": 0.75, "reads_per_s": 1.0,
                            "loads_per_s": 4.0, "prefix_cache_hit_rate": 0.25}
    fig.update(adapter_loads=None, adapter_reads=None)
    assert derived(fig)["resident_hit_rate"] is None and derived(fig)["reads_per_s"] is None


def test_synthetic_adapters_are_valid_distinct_and_resumable(tiny_llama, tmp_path):
    from vllm_deepthink.format import DeepThinkAdapter, ModelFingerprint

    paths = write_synthetic_adapters(tiny_llama, tmp_path / "store", N, 16)
    assert [p.name for p in paths] == [adapter_label(i) for i in range(N)]
    fingerprint = ModelFingerprint.from_checkpoint(tiny_llama)
    adapters = [DeepThinkAdapter.from_pretrained(p, expected_fingerprint=fingerprint)
                for p in paths]
    assert len({a.digest for a in adapters}) == N          # distinct weights digests
    assert all(a.prefix_len == 16 and a.config.method == "past-kv" for a in adapters)
    stamps = [(p / "deepthink_model.safetensors").stat().st_mtime_ns for p in paths]
    more = write_synthetic_adapters(tiny_llama, tmp_path / "store", N + 1, 16)
    assert [(p / "deepthink_model.safetensors").stat().st_mtime_ns for p in more[:N]] == stamps
    served = adapter_dir_of(more, tmp_path / "dirs" / "n")
    assert sorted(c.name for c in served.iterdir()) == [adapter_label(i) for i in range(N + 1)]
    served = adapter_dir_of(more[:2], served)                   # shrinks to exactly these
    assert sorted(c.name for c in served.iterdir()) == [adapter_label(0), adapter_label(1)]


def test_prompts_name_the_adapter_or_carry_its_demos(tiny_llama):
    from transformers import AutoTokenizer

    from vllm_deepthink.apps.bench.scale import demo_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    options = ScaleOptions(model=str(tiny_llama), prefix_len=PREFIX, query_len=QUERY)
    picks = [2, None, 0]
    dt_texts, dt_names = request_prompts(tok, "deepthink", picks, options, "timed")
    apc_texts, apc_names = request_prompts(tok, "icl-apc", picks, options, "timed")
    assert dt_names == [adapter_label(2), "base", adapter_label(0)]
    assert apc_names == ["base"] * 3
    for pick, dt, apc in zip(picks, dt_texts, apc_texts):
        query = tok.encode(dt, add_special_tokens=False)
        assert len(query) == QUERY
        demos = [] if pick is None else demo_ids(tok, pick, PREFIX, 0)
        assert tok.encode(apc, add_special_tokens=False) == demos + query


def test_bad_options_name_the_parameter(tiny_llama, tmp_path):
    with pytest.raises(ScaleError, match="`plain_share` must be in"):
        run_scale(ScaleOptions(model=str(tiny_llama), plain_share=2.0))
    with pytest.raises(ScaleError, match="`systems`"):
        run_scale(ScaleOptions(model=str(tiny_llama), systems=["icl-no-apc"]))
    out = tmp_path / "other.json"
    out.write_text(json.dumps({"settings": {"prefix_len": 1}, "runs": {}}))
    with pytest.raises(ScaleError, match="other settings"):
        run_scale(ScaleOptions(model=str(tiny_llama), output_json=str(out)))


# ------------------------------------------------------------------ one small run

def _scale_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vllm_deepthink.apps.cli", "bench", "--scale",
            "--model", str(model), "--scale-adapters", str(N), "--scale-systems", "deepthink",
            "--no-memory-baseline", "--prefix-len", str(PREFIX), "--query-len", str(QUERY),
            "--output-len", str(OUTPUT), "--server-requests", str(REQUESTS),
            "--warmup-requests", "3", "--block-size", "32", "--kv-cache-gib", "1",
            "--resident-gib", "0.01", "--request-rate", "inf",
            "--work-dir", str(out / "work"), "--output-json", str(out / "scale.json"),
            "--plot", str(out / "scale.png")]


@pytest.fixture(scope="module")
def scale_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    proc = subprocess.run(_scale_cmd(tiny_llama, out), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.engine
def test_scale_json_fields_are_present_and_consistent(scale_run):
    report = json.loads((scale_run / "scale.json").read_text())
    assert report["kind"] == "scale" and list(report["runs"]) == [str(N)]
    assert report["settings"]["zipf_s"] == 1.1 and report["settings"]["kv_cache_gib"] == 1
    assert report["environment"]["uptime"] and "baseline" not in report
    fig = report["runs"][str(N)]["deepthink"]
    assert "error" not in fig, fig.get("error")
    assert (fig["completed"], fig["failed"], fig["errors"]) == (REQUESTS, 0, [])
    assert fig["requests"] == REQUESTS == fig["plain_requests"] + fig["adapter_requests"]
    assert fig["plain_requests"] == round(0.1 * REQUESTS)
    assert 1 <= fig["distinct_adapters_requested"] <= N
    # Each adapter requested after the prefix-cache reset is loaded at least once; a
    # read happens only for a load whose adapter is not resident.
    assert fig["distinct_adapters_requested"] <= fig["adapter_loads"] <= fig["adapter_requests"]
    assert 0 <= fig["adapter_reads"] <= fig["adapter_loads"]
    assert 0.0 <= fig["resident_hit_rate"] <= 1.0
    assert fig["resident_hit_rate"] == pytest.approx(1 - fig["adapter_reads"] / fig["adapter_loads"])
    assert fig["reads_per_s"] == pytest.approx(fig["adapter_reads"] / fig["duration"])
    assert 0.0 <= fig["prefix_cache_hit_rate"] <= 1.0
    assert fig["total_input_tokens"] == REQUESTS * QUERY        # the query alone
    assert fig["total_output_tokens"] == REQUESTS * OUTPUT
    assert 0 < fig["p50_ttft_ms"] <= fig["p99_ttft_ms"]
    assert fig["startup_s"] > 0 and fig["api_server_rss_bytes"] > 0
    assert fig["models_list"]["entries"] == N + 1 and fig["models_list"]["calls"] == 5
    assert "load average" in fig["uptime_before"] and "load average" in fig["uptime_after"]
    saved = json.loads(Path(fig["result_file"]).read_text())   # vllm bench serve's own
    assert saved["completed"] == REQUESTS and len(saved["ttfts"]) == REQUESTS
    (row,) = report["summary"]
    assert row["adapters"] == N
    assert row["deepthink"]["request_throughput"] == fig["request_throughput"]
    assert "api_server_bytes_per_adapter" not in row["deepthink"]  # no baseline was run
    # The plugin's own time over the timed run, from the server's /metrics.
    cost = fig["plugin_cost"]
    assert 0 < cost["frontend"]["requests"] <= fig["adapter_requests"]
    assert cost["scheduler"]["steps"] > 0 and cost["worker"]["microseconds"] > 0
    assert fig["plugin_us_per_request"] == pytest.approx(sum(
        p["microseconds"] for name, p in cost.items() if name != "worker_read")
        / fig["adapter_requests"])
    assert row["deepthink"]["plugin_us_per_request"] == fig["plugin_us_per_request"]


@pytest.mark.engine
def test_scale_plot_is_written(scale_run):
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(scale_run / "scale.png").shape
    assert width > height > 100


@pytest.mark.engine
def test_a_second_run_resumes_without_measuring_again(scale_run, tiny_llama):
    before = json.loads((scale_run / "scale.json").read_text())
    proc = subprocess.run(_scale_cmd(tiny_llama, scale_run), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((scale_run / "scale.json").read_text())
    assert after["runs"] == before["runs"] and after["created"] == before["created"]
    assert len(after["environment"]["uptime"]) == len(before["environment"]["uptime"]) + 1
    assert not list((scale_run / "work" / "logs").glob("*baseline*"))
