"""Where a distilled adapter's answers differ from its source's: writes
results/compression/margins.json (read in results/README.md, "Compression").

    .venv/bin/python results/compression/margins.py --data-dir ../shared/data \
        [--rows smollm2-trec-s0,...] [--models-dir models] [--threads 2]

For each row: the source adapter rebuilt as the compression table does, its test items
scored, the table's dist-L/8 column built again (source teacher, the table's defaults)
and scored. Per item, the source's margin is its best label's log-probability minus the
second best's (nats, whole labels). The JSON gives the agreement per quartile of that
margin, the labels involved in the disagreements, and each row's margin quartiles, so a
row whose answers differ mostly on near-ties can be told from one where the compressed
prefix moves confident answers. A measurement, not a setting: nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from vllm_deepthink.apps.compression import run
from vllm_deepthink.apps.compression.specs import COLUMNS, TableOptions, select_rows
from vllm_deepthink.apps.results.runs import ModelContext
from vllm_deepthink.apps.results.table import model_dir
from vllm_deepthink.tasks import scoring

HERE = Path(__file__).resolve().parent
DEFAULT_ROWS = "smollm2-trec-s0,smollm2-trec-s1,smollm2-trec-s2,smollm2-sst5-s0"


def margins(scores) -> list[float]:
    """Best minus second-best whole-label log-probability, per item."""
    out = []
    for item in scores:
        top = sorted((s for s, _ in item), reverse=True)
        out.append(top[0] - top[1])
    return out


def quartile_edges(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75)]


def summarize(source_scores, compressed_scores, choices) -> dict:
    src = scoring.predictions(source_scores)
    comp = scoring.predictions(compressed_scores)
    margin = margins(source_scores)
    edges = quartile_edges(margin)
    bins = [[], [], [], []]
    for m, a, b in zip(margin, src, comp):
        bins[sum(m > e for e in edges)].append(a == b)
    differ = [(a, b) for a, b in zip(src, comp) if a != b]
    names = choices or [str(i) for i in range(len(source_scores[0]))]
    return {
        "n": len(src), "agreement": sum(a == b for a, b in zip(src, comp)) / len(src),
        "margin_quartiles_nats": [round(e, 4) for e in edges],
        "agreement_by_margin_quartile": [round(sum(b) / len(b), 4) for b in bins],
        "items_per_quartile": [len(b) for b in bins],
        "differing": len(differ),
        "differing_pairs": {f"{names[a]} -> {names[b]}": c
                            for (a, b), c in Counter(differ).most_common(8)},
        "source_answers": {names[i]: c for i, c in sorted(Counter(src).items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "margins.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = TableOptions(data_dir=Path(args.data_dir), progress=False)
    column = next(c for c in COLUMNS if c.name == "dist-L/8")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    result["settings"] = {"column": column.name, "steps": options.steps, "lr": options.lr,
                          "queries": options.queries, "items": "every test item of the row"}
    contexts: dict[str, ModelContext] = {}
    for spec in select_rows(args.rows):
        if spec.key in result["rows"]:
            continue
        if spec.model not in contexts:
            contexts = {spec.model: ModelContext(spec.model,
                                                 model_dir(spec.model, args.models_dir))}
        ctx, t = contexts[spec.model], time.perf_counter()
        row = run.results_row(options.results_dir, spec)
        inputs = run.prepare(spec, ctx, options, row)
        source, _ = run.rebuild_source(spec, ctx, row, inputs)
        source_scores = run.score(ctx, inputs.plan, source.keys, source.values, 16)
        adapter = run.compress_column(column, source, ctx, inputs, options, {})
        compressed_scores = run.score(ctx, inputs.plan, adapter.keys, adapter.values, 16)
        summary = summarize(source_scores, compressed_scores, inputs.choices)
        summary.update(k=adapter.prefix_len, source_len=source.prefix_len,
                       seconds=round(time.perf_counter() - t, 1))
        result["rows"][spec.key] = summary
        out.write_text(json.dumps(result, indent=1) + "\n")  # each row kept as it finishes
        print(spec.key, json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
