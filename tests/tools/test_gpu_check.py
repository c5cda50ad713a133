"""`make gpu-check`: the CUDA matrix it would run, its refusal without CUDA, and its
CPU path end to end (the same machinery with the settings of `make test`)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from vllm_deepthink.tools import gpu_check


def test_cuda_matrix_covers_runners_dtypes_backends_and_graphs(monkeypatch):
    monkeypatch.setattr(gpu_check, "installed_backends", lambda: ["FLASH_ATTN", "FLASHINFER"])
    one_gpu = gpu_check.cuda_settings(num_gpus=1, tests=None)
    names = {s.name for s in one_gpu}
    for runner in ("V1", "V2"):
        assert f"cuda runner={runner} float32 auto block=16 cuda-graphs" in names
        for dtype in ("bfloat16", "float16"):
            for backend in ("FLASH_ATTN", "FLASHINFER"):
                assert f"cuda runner={runner} {dtype} {backend} block=16 cuda-graphs" in names
    assert len(one_gpu) == 10
    assert all(not s.eager and s.block_size == 16 for s in one_gpu)
    assert all(gpu_check.TP_TESTS[0] not in s.tests for s in one_gpu)
    assert all(gpu_check.REAL_TESTS[0] in s.tests for s in one_gpu)  # every dtype, backend
    two_gpus = gpu_check.cuda_settings(num_gpus=2, tests=None)
    assert all(gpu_check.TP_TESTS[0] in s.tests for s in two_gpus)
    env = one_gpu[0].env(log=gpu_check.REPO_ROOT / "x.jsonl")
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and env["DEEPTHINK_TEST_EAGER"] == "0"
    assert env["DEEPTHINK_TEST_TOL"] == "0.001" and env["DEEPTHINK_TEST_GREEDY"] == "1"
    bf16 = next(s for s in one_gpu if s.dtype == "bfloat16").env(log=gpu_check.REPO_ROOT)
    assert bf16["DEEPTHINK_TEST_GREEDY"] == "0"  # recorded, not judged


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so(capsys):
    with pytest.raises(gpu_check.NoCudaDevice, match="no CUDA device"):
        gpu_check.check("cuda")
    args = argparse.Namespace(device="cuda", tests=None, output_json=None)
    assert gpu_check.main(args) == 2
    assert "pip install -e \".[cuda,dev]\"" in capsys.readouterr().err


@pytest.mark.engine
def test_cpu_path_runs_the_parity_suite_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    args = argparse.Namespace(device="cpu", tests=["tests/plugin/test_parity_gpt2.py"],
                              output_json=str(out))
    assert gpu_check.main(args) == 0
    table = capsys.readouterr().out
    assert "| cpu runner=default float32 auto block=32 eager | pass |" in table
    (row,) = json.loads(out.read_text())
    assert row["checks"] >= 4 and row["greedy_equal"] == row["checks"]
    assert 0 <= row["max_abs_diff"] <= 1e-4
