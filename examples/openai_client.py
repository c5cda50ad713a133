"""Query a running `vllm serve` of Deep-Thinking adapters with the official openai client.

    vllm serve models/smollm2-135m --dtype float32 \
        --deepthink-adapter sst2=adapters_store/sst2-smollm2 &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --model sst2 \
        --prompt "Review: a charming film\nSentiment:" --choices " negative" " positive"

The adapter's name is the OpenAI `model`. Choices are scored from the echoed prompt
logprobs: the log-probability of each choice's tokens after the query.
"""

import argparse
import json

from openai import OpenAI


def choice_logprob(client: OpenAI, model: str, query: str, choice: str) -> float:
    """log p(choice | adapter prefix, query): the echoed logprobs of the tokens that
    start at or after the end of the query text."""
    response = client.completions.create(model=model, prompt=query + choice, max_tokens=1,
                                         echo=True, logprobs=0, temperature=0.0)
    logprobs = response.choices[0].logprobs
    prompt_tokens = response.usage.prompt_tokens
    offsets = logprobs.text_offset[:prompt_tokens]
    return sum(lp for offset, lp in zip(offsets, logprobs.token_logprobs[:prompt_tokens])
               if offset >= len(query))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="an adapter name (or the base model)")
    parser.add_argument("--prompt", default="Review: a charming film\nSentiment:")
    parser.add_argument("--choices", nargs="*", default=[],
                        help="candidate continuations, each with its leading space")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--output-json", help="also write the results here")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")

    models = [(card.id, card.parent) for card in client.models.list().data]
    for model_id, parent in models:
        print(f"model {model_id}" + (f" (adapter of {parent})" if parent else ""))

    response = client.completions.create(model=args.model, prompt=args.prompt,
                                         max_tokens=args.max_tokens, temperature=0.0)
    text = response.choices[0].text
    print(f"[{response.model}] {args.prompt!r} -> {text!r}")

    scores = {choice: choice_logprob(client, args.model, args.prompt, choice)
              for choice in args.choices}
    if scores:
        for choice, score in scores.items():
            print(f"  {choice!r}: {score:.4f}")
        print(f"prediction: {max(scores, key=scores.get)!r}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump({"models": models, "model": response.model, "text": text,
                       "scores": scores}, handle, indent=2)


if __name__ == "__main__":
    main()
