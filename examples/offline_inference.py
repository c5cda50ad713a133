"""Offline inference with `vllm.LLM`: several Deep-Thinking adapters and the base model
in one batch, on one engine.

    VLLM_CPU_KVCACHE_SPACE=1 python examples/offline_inference.py \
        --model models/smollm2-135m \
        --adapter sst2=adapters_store/sst2-smollm2 --adapter trec=adapters_store/trec-smollm2 \
        --prompt "Review: a charming film\nSentiment:"

Each prompt runs once per adapter (the query after the adapter's learned K/V prefix)
and once on the base model alone.
"""

import argparse
import json

from vllm import LLM, SamplingParams

import vllm_deepthink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                        help="an adapter to serve (repeatable)")
    parser.add_argument("--prompt", action="append", help="a query (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--output-json", help="also write the results here")
    args = parser.parse_args()
    adapters = dict(spec.split("=", 1) for spec in args.adapter)
    prompts = args.prompt or ["Review: a charming film\nSentiment:"]

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True,
              max_model_len=args.max_model_len, **vllm_deepthink.engine_args(adapters))

    # One generate call: every (prompt, adapter) pair, plus every prompt on the base model.
    jobs = [(name, prompt) for name in adapters for prompt in prompts]
    params = [vllm_deepthink.sampling_params(adapter=name, max_tokens=args.max_tokens,
                                             temperature=0.0) for name, _ in jobs]
    jobs += [(None, prompt) for prompt in prompts]
    params += [SamplingParams(max_tokens=args.max_tokens, temperature=0.0)] * len(prompts)
    outputs = llm.generate([prompt for _, prompt in jobs], params)

    results = []
    for (name, prompt), output in zip(jobs, outputs):
        completion = output.outputs[0]
        print(f"[{name or 'base model'}] {prompt!r} -> {completion.text!r}")
        results.append({"adapter": name, "prompt": prompt, "text": completion.text,
                        "token_ids": list(completion.token_ids)})
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
