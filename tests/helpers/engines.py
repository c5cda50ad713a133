"""Test engines (vLLM `LLM` on CPU with the plugin) and the parity check against HF.

`start_engine` starts one small engine (once per test module, or shared through the
`engine_factory` fixture of tests/conftest.py); `assert_parity` compares a vLLM
RequestOutput with a `tests.helpers.references.Reference`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path

from tests.helpers.references import Reference, max_abs_diff


def vllm_prompt_logprobs(output) -> list[float]:
    """Logprob of each query token after the first, from a vLLM RequestOutput."""
    rows = output.prompt_logprobs
    assert rows is not None and rows[0] is None, "first prompt token must have no logprob"
    ids = output.prompt_token_ids
    return [rows[j][ids[j]].logprob for j in range(1, len(ids))]


def engine_env() -> None:
    """This process becomes a test engine's environment (set before the engine starts):
    the product's `engine_env`, the one every engine we start gets."""
    from vllm_deepthink.apps.processes import engine_env as product_engine_env

    os.environ.update(product_engine_env())


# The engine the parity tests run, from the environment (vllm_deepthink.tools.gpu_check
# sets these to sweep CUDA settings); the defaults are the CPU settings of `make test`.
#   DEEPTHINK_TEST_DTYPE              float32 | bfloat16 | float16
#   DEEPTHINK_TEST_BLOCK_SIZE         KV block size (CPU needs a multiple of 32)
#   DEEPTHINK_TEST_EAGER              1 = enforce_eager (CPU); 0 = CUDA graphs
#   DEEPTHINK_TEST_ATTENTION_BACKEND  e.g. FLASH_ATTN, FLASHINFER (vLLM's choice if unset)
#   DEEPTHINK_TEST_TOL                largest prompt-logprob difference to HF fp32
#   DEEPTHINK_TEST_GREEDY             1 = greedy tokens must equal HF's (0 records only)
#   DEEPTHINK_PARITY_LOG              JSONL file every parity check appends its figures to
ENV = os.environ
BLOCK_SIZE = int(ENV.get("DEEPTHINK_TEST_BLOCK_SIZE", "32"))


def engine_settings() -> dict:
    settings = dict(dtype=ENV.get("DEEPTHINK_TEST_DTYPE", "float32"),
                    enforce_eager=ENV.get("DEEPTHINK_TEST_EAGER", "1") == "1",
                    block_size=BLOCK_SIZE)
    if ENV.get("DEEPTHINK_TEST_ATTENTION_BACKEND"):
        settings["attention_backend"] = ENV["DEEPTHINK_TEST_ATTENTION_BACKEND"]
    return settings


# vLLM's CPU worker does not exit on its shutdown request (stock vLLM too): the client
# waits out its grace period, then kills the engine. A test engine gets a short one.
SHUTDOWN_TIMEOUT_S = 1.0


def shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
    del llm
    gc.collect()


QUERIES = [
    "Question: what is the capital of France ?\nType: The quick brown fox jumps over the lazy dog.",
    "Review: contains no wit , only labored gags\nSentiment: the grass was cut. 0123456789 "
    "The quick brown fox",
    "Premise: the sun was rising. Answer:",
    "The lazy dog. Premise: the sun was rising. Answer: the grass was cut. Review: a charming film",
]


def start_engine(model_dir, adapters: dict[str, Path], **kwargs):
    """A small CPU test engine serving `adapters` (call once per test module)."""
    engine_env()
    import vllm_deepthink
    from vllm import LLM

    settings = dict(max_model_len=256, max_num_seqs=8, seed=0, **engine_settings())
    settings.update(kwargs)
    return LLM(model=str(model_dir), **vllm_deepthink.engine_args(adapters=adapters, **settings))


def parity_params(adapter: str | None, num_greedy: int = 16, prompt_logprobs: int | None = 0):
    """Greedy decoding of `num_greedy` tokens (EOS ignored), with prompt logprobs."""
    import vllm_deepthink
    from vllm import SamplingParams

    kwargs = dict(max_tokens=num_greedy, temperature=0.0, ignore_eos=True,
                  prompt_logprobs=prompt_logprobs)
    if adapter is None:
        return SamplingParams(**kwargs)
    return vllm_deepthink.sampling_params(adapter=adapter, **kwargs)


def assert_parity(output, reference: Reference, query_ids: list[int],
                  tol: float | None = None, label: str = "") -> float:
    """Assert a vLLM RequestOutput matches the HF reference; returns the largest
    prompt-logprob difference (printed, and logged to DEEPTHINK_PARITY_LOG)."""
    tol = float(ENV.get("DEEPTHINK_TEST_TOL", "1e-4")) if tol is None else tol
    assert output.outputs[0].finish_reason == "length", f"{label}: request failed"
    assert list(output.prompt_token_ids) == list(query_ids), f"{label}: placeholders leaked"
    assert len(output.prompt_logprobs) == len(query_ids)
    diff = max_abs_diff(vllm_prompt_logprobs(output), reference.prompt_logprobs)
    greedy_equal = list(output.outputs[0].token_ids) == reference.greedy_tokens
    print(f"[parity] {label}: max |logprob diff| = {diff:.2e} over {len(query_ids) - 1} "
          f"query tokens; greedy equal = {greedy_equal}")
    if ENV.get("DEEPTHINK_PARITY_LOG"):
        with open(ENV["DEEPTHINK_PARITY_LOG"], "a") as log:
            log.write(json.dumps({"label": label, "max_abs_diff": diff,
                                  "greedy_equal": greedy_equal}) + "\n")
    assert diff <= tol, f"{label}: prompt logprobs differ from HF by {diff:.2e} > {tol}"
    if ENV.get("DEEPTHINK_TEST_GREEDY", "1") == "1":
        assert greedy_equal, f"{label}: greedy tokens differ from HF"
    return diff
