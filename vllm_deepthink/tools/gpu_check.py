"""`make gpu-check`: the parity suite across the CUDA settings vLLM users run.

On a CUDA machine (with `pip install -e ".[cuda,dev]"`), runs the parity tests of this
repository (tiny Llama and GPT-2, mixed batch, the same query twice, tensor parallel 2
when two GPUs exist, the real default models) for each combination of

    model runner   VLLM_USE_V2_MODEL_RUNNER=0 and 1 (V2 is vLLM 0.32's CUDA default)
    dtype          float32 (strict: HF parity 1e-3, greedy tokens equal),
                   bfloat16 and float16 (differences recorded, greedy recorded)
    attention      FLASH_ATTN and FLASHINFER where installed (float32: vLLM's choice)
    engine         CUDA graphs on (no enforce_eager), block size 16

and prints one table of the largest prompt-logprob difference to HF fp32 per setting.
The tests read these settings from DEEPTHINK_TEST_* variables
(tests/helpers/adapter_factory.py). Without CUDA it says so and exits with status 2;
`--device cpu` runs the same machinery with the CPU settings of `make test`.

    python -m vllm_deepthink.tools.gpu_check [--device cuda|cpu] [--tests FILE ...]
        [--output-json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_TESTS = ("tests/plugin/test_parity_llama.py", "tests/plugin/test_parity_gpt2.py",
              "tests/plugin/test_mixed_batch.py")
TP_TESTS = ("tests/plugin/test_tp.py",)
REAL_TESTS = ("tests/plugin/test_real_parity.py",)
# Largest prompt-logprob difference to HF fp32 a setting must stay under, and whether
# its greedy tokens must equal HF's. 16-bit engines are recorded, not judged: their
# rounding moves logprobs by 1e-2 and can flip a near-tie of a tiny random model.
STRICT = {"float32": (1e-3, True)}


@dataclass
class Setting:
    device: str
    runner: str | None      # VLLM_USE_V2_MODEL_RUNNER, None = vLLM's default
    dtype: str
    backend: str | None     # attention backend, None = vLLM's choice
    block_size: int
    eager: bool
    tests: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        runner = {None: "default", "0": "V1", "1": "V2"}[self.runner]
        graphs = "eager" if self.eager else "cuda-graphs"
        return (f"{self.device} runner={runner} {self.dtype} {self.backend or 'auto'} "
                f"block={self.block_size} {graphs}")

    def env(self, log: Path) -> dict[str, str]:
        tol, greedy = STRICT.get(self.dtype, (1e9, False))
        if self.device == "cpu":
            tol = 1e-4
        env = dict(os.environ, DEEPTHINK_TEST_DTYPE=self.dtype,
                   DEEPTHINK_TEST_BLOCK_SIZE=str(self.block_size),
                   DEEPTHINK_TEST_EAGER="1" if self.eager else "0",
                   DEEPTHINK_TEST_TOL=str(tol), DEEPTHINK_TEST_GREEDY="1" if greedy else "0",
                   DEEPTHINK_PARITY_LOG=str(log))
        if self.backend:
            env["DEEPTHINK_TEST_ATTENTION_BACKEND"] = self.backend
        if self.runner is not None:
            env["VLLM_USE_V2_MODEL_RUNNER"] = self.runner
        return env


def installed_backends() -> list[str]:
    """The CUDA attention backends importable here."""
    found = []
    if importlib.util.find_spec("vllm.vllm_flash_attn") is not None:
        found.append("FLASH_ATTN")
    if importlib.util.find_spec("flashinfer") is not None:
        found.append("FLASHINFER")
    return found


def cuda_settings(num_gpus: int, tests: tuple[str, ...] | None) -> list[Setting]:
    suite = tests or TINY_TESTS + (TP_TESTS if num_gpus >= 2 else ()) + REAL_TESTS
    settings = []
    for runner in ("0", "1"):
        settings.append(Setting("cuda", runner, "float32", None, 16, False, suite))
        for dtype, backend in itertools.product(("bfloat16", "float16"), installed_backends()):
            settings.append(Setting("cuda", runner, dtype, backend, 16, False, suite))
    return settings


def cpu_settings(tests: tuple[str, ...] | None) -> list[Setting]:
    return [Setting("cpu", None, "float32", None, 32, True, tests or TINY_TESTS)]


def run_setting(setting: Setting, log: Path) -> dict[str, Any]:
    """Run the setting's tests, their parity checks appended to `log`; returns its row
    of the table."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *setting.tests]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=setting.env(log), capture_output=True,
                          text=True)
    records = ([json.loads(line) for line in log.read_text().splitlines()]
               if log.is_file() else [])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"setting": setting.name, "tests": list(setting.tests),
            "pytest_exit": proc.returncode, "summary": tail[0],
            "checks": len(records),
            "max_abs_diff": max((r["max_abs_diff"] for r in records), default=None),
            "greedy_equal": sum(r["greedy_equal"] for r in records),
            "worst": max(records, key=lambda r: r["max_abs_diff"])["label"] if records else None}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | pytest | checks | max abs logprob diff | greedy equal | worst |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        status = "pass" if row["pytest_exit"] == 0 else f"FAIL ({row['summary']})"
        lines.append(f"| {row['setting']} | {status} | {row['checks']} | {diff} | "
                     f"{row['greedy_equal']}/{row['checks']} | {row['worst'] or '-'} |")
    return "\n".join(lines)


class NoCudaDevice(RuntimeError):
    """`--device cuda` on a machine without one; main() exits with status 2."""


def check(device: str, tests: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every setting's row (raises NoCudaDevice for cuda without a CUDA device)."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise NoCudaDevice(
                "gpu-check: no CUDA device (torch.cuda.is_available() is False). It needs a "
                "CUDA machine with vLLM for CUDA: pip install -e \".[cuda,dev]\". On CPU, "
                "`make test` runs the same parity suite (or: gpu_check --device cpu).")
        settings = cuda_settings(torch.cuda.device_count(), tests)
    else:
        settings = cpu_settings(tests)
    with tempfile.TemporaryDirectory() as work:
        from tqdm.auto import tqdm

        return [run_setting(s, Path(work) / f"{i}.jsonl")
                for i, s in enumerate(tqdm(settings, desc="gpu-check"))]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files to run (default: the parity suite)")
    parser.add_argument("--output-json", default=None)


def main(args: argparse.Namespace) -> int:
    try:
        rows = check(args.device, tuple(args.tests) if args.tests else None)
    except NoCudaDevice as exc:
        print(exc, file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["pytest_exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    sys.exit(main(parser.parse_args()))
