"""Test adapters built directly from HF K/V, and HF reference results.

An adapter here is the model's own K/V of some demo ids, perturbed (so serving
it is not plain in-context learning) and saved in the adapter format. The HF
reference is `model(query, past_key_values=adapter)`: the ground truth every
vLLM parity test compares against.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers.tiny_models import CORPUS
from vllm_deepthink.format import DeepThinkAdapter, DeepThinkConfig
from vllm_deepthink.format import ModelFingerprint


def demo_ids(tokenizer, length: int, offset: int = 0) -> list[int]:
    """`length` demo token ids: BOS + corpus text (rotated by `offset`), cut to length."""
    text = "\n\n".join(CORPUS[offset:] + CORPUS[:offset])
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    while len(ids) < length:
        ids = ids + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:length]


def prefix_cache(model, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """A fresh transformers cache holding per-layer [kv_heads, L, D] K/V."""
    from transformers import DynamicCache

    return DynamicCache([(k.unsqueeze(0).clone(), v.unsqueeze(0).clone())
                         for k, v in zip(keys, values)], config=model.config)


def build_adapter(model, tokenizer, out_dir: str | Path, prefix_len: int, *,
                  noise: float = 0.3, seed: int = 0, offset: int = 0) -> DeepThinkAdapter:
    """Save an adapter: K/V of `prefix_len` demo ids, each tensor moved by
    `noise` times its own std in a random direction."""
    ids = demo_ids(tokenizer, prefix_len, offset)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    generator = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layer in out.past_key_values.layers:
        for source, target in ((layer.keys, keys), (layer.values, values)):
            kv = source[0].float()                          # [kv_heads, L, D]
            kv = kv + noise * kv.std() * torch.randn(kv.shape, generator=generator)
            target.append(kv.contiguous())
    config = DeepThinkConfig(
        base_model_name_or_path=str(getattr(model, "name_or_path", "")),
        fingerprint=ModelFingerprint.from_model(model), prefix_len=prefix_len,
        dtype="float32", demos_text=tokenizer.decode(ids), demo_token_ids=ids,
        optimizer="momentum", optimizer_params={"step_size": 0.01, "beta": 0.9},
        position_mode="published", iterations_run=1, selected_iteration=1,
        build_args={"test_noise": noise, "seed": seed})
    adapter = DeepThinkAdapter(config=config, keys=keys, values=values)
    adapter.save_pretrained(out_dir)
    return adapter


def count_reads(monkeypatch) -> list[Path]:
    """The reads of adapter weights files in this process from now on: one entry (the
    file's path) per read (the format's one reader of a weights file)."""
    from vllm_deepthink.format import adapter as adapter_module

    reads, read = [], adapter_module._read_weights
    monkeypatch.setattr(adapter_module, "_read_weights",
                        lambda path, config: reads.append(Path(path)) or read(path, config))
    return reads


# Keys a format_version 1 config has (written by vllm-deepthink before methods existed).
V1_KEYS = ("base_model_name_or_path", "fingerprint", "prefix_len", "dtype", "demos_text",
           "demo_token_ids", "optimizer", "optimizer_params", "position_mode", "iterations_run",
           "selected_iteration", "selection_trace", "task", "build_args", "builder_version",
           "format_version")
# Keys the first format_version 2 config had (the code of 4abdbc3: methods, before
# selection, label_calibration and compression were recorded).
V2_FIRST_KEYS = (*V1_KEYS, "method", "num_virtual_tokens", "prefix_special_ids", "provenance")


def write_old_adapter(adapter: DeepThinkAdapter, out_dir: str | Path, version: int,
                      keys: tuple[str, ...]) -> Path:
    """Write `adapter` the way an older vllm-deepthink did: format_version `version`, the
    config keys `keys` only (each present in the adapter's config), the header of that
    config as written."""
    import hashlib
    import json

    from safetensors.torch import save as safetensors_save

    data = {key: value for key, value in adapter.config.to_dict().items() if key in keys}
    data["format_version"] = version
    assert set(data) == set(keys)
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    tensors = {}
    for i, (k, v) in enumerate(zip(adapter.keys, adapter.values)):
        tensors[f"layers.{i}.key"] = k.contiguous()
        tensors[f"layers.{i}.value"] = v.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "deepthink_model.safetensors").write_bytes(safetensors_save(tensors, metadata={
        "deepthink_config_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "format": "deepthink", "format_version": str(version)}))
    (out_dir / "deepthink_config.json").write_text(
        json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def write_v1_adapter(adapter: DeepThinkAdapter, out_dir: str | Path) -> Path:
    """Write a Deep-Thinking adapter the way format_version 1 did (the code of main
    before format v2): the v1 config keys only, the v1 header."""
    return write_old_adapter(adapter, out_dir, 1, V1_KEYS)


def write_first_v2_adapter(adapter: DeepThinkAdapter, out_dir: str | Path) -> Path:
    """Write an adapter the way the first format_version 2 code did: no "selection",
    "label_calibration" or "compression" key (they default when read)."""
    return write_old_adapter(adapter, out_dir, 2, V2_FIRST_KEYS)


@dataclass
class Reference:
    """HF results for one query: logprob of query token j (j >= 1) given the
    prefix and the query before it, and the greedy continuation."""

    prompt_logprobs: list[float]
    greedy_tokens: list[int]


def hf_reference(model, adapter: DeepThinkAdapter | None, query_ids: list[int],
                 num_greedy: int = 16) -> Reference:
    """`model(query, past_key_values=adapter)`; adapter None = no prefix."""
    cache = (prefix_cache(model, adapter.keys, adapter.values) if adapter is not None
             else None)
    with torch.no_grad():
        out = model(torch.tensor([query_ids]), past_key_values=cache, use_cache=True)
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)     # [q, vocab]
        prompt = [logprobs[j - 1, query_ids[j]].item() for j in range(1, len(query_ids))]
        cache = out.past_key_values
        greedy = []
        next_id = int(logprobs[-1].argmax())
        for _ in range(num_greedy):
            greedy.append(next_id)
            out = model(torch.tensor([[next_id]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_id = int(out.logits[0, -1].argmax())
    return Reference(prompt_logprobs=prompt, greedy_tokens=greedy)


def vllm_prompt_logprobs(output) -> list[float]:
    """Logprob of each query token after the first, from a vLLM RequestOutput."""
    rows = output.prompt_logprobs
    assert rows is not None and rows[0] is None, "first prompt token must have no logprob"
    ids = output.prompt_token_ids
    return [rows[j][ids[j]].logprob for j in range(1, len(ids))]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), f"lengths differ: {len(a)} vs {len(b)}"
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


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


def shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
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


def icl_reference(model, adapter: DeepThinkAdapter, query_ids: list[int],
                  num_greedy: int = 16) -> Reference:
    """HF result of the plain prompt demo ids + query ids (no adapter)."""
    ids = list(adapter.config.demo_token_ids) + list(query_ids)
    full = hf_reference(model, None, ids, num_greedy=num_greedy)
    start = len(adapter.config.demo_token_ids)
    return Reference(prompt_logprobs=full.prompt_logprobs[start:],
                     greedy_tokens=full.greedy_tokens)


def hf_next_logits(model, adapter: DeepThinkAdapter | None, ids: list[int]) -> torch.Tensor:
    """[vocab] next-token logits after `ids`, with the adapter's K/V as the prefix
    (adapter None: no prefix)."""
    cache = prefix_cache(model, adapter.keys, adapter.values) if adapter is not None else None
    with torch.no_grad():
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=cache is not None)
    return out.logits[0, -1].float()


def hf_beam_search(model, adapter: DeepThinkAdapter | None, query_ids: list[int],
                   beam_width: int, max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """vLLM's online beam search (vllm/entrypoints/generate/beam_search/online.py) with
    ignore_eos and length_penalty 1, on HF logprobs: each step takes the 2 * beam_width
    best next tokens of every beam and keeps the beam_width best sums; the final beams
    are sorted by sum / length. Returns, best first, (generated ids, logprob of each)."""
    beams: list[tuple[float, list[int], list[float]]] = [(0.0, [], [])]
    for _ in range(max_tokens):
        candidates = []
        for cum, generated, logprobs in beams:
            step = torch.log_softmax(hf_next_logits(model, adapter, query_ids + generated), -1)
            top = torch.topk(step, 2 * beam_width)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((cum + value, generated + [token], logprobs + [value]))
        candidates.sort(key=lambda c: c[0], reverse=True)
        beams = candidates[:beam_width]
    length = len(query_ids) + max_tokens
    beams.sort(key=lambda b: b[0] / length, reverse=True)
    return [(generated, logprobs) for _, generated, logprobs in beams]


def hf_greedy_with_repetition_penalty(model, adapter: DeepThinkAdapter | None,
                                      query_ids: list[int], num_tokens: int, penalty: float,
                                      extra_prompt_ids: list[int]) -> list[int]:
    """Greedy decoding with vLLM's repetition penalty (vllm/model_executor/layers/utils.py
    apply_penalties: the logit of a token seen in the prompt or the output is divided by
    the penalty when positive, multiplied when negative). The prompt's tokens, for the
    penalty, are `extra_prompt_ids` + query ids."""
    generated: list[int] = []
    for _ in range(num_tokens):
        logits = hf_next_logits(model, adapter, list(query_ids) + generated).clone()
        seen = sorted(set(extra_prompt_ids) | set(query_ids) | set(generated))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        generated.append(int(logits.argmax()))
    return generated
