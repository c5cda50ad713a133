"""The comparisons of a compression row, on the same test items: each compressed column
(and the source) against the source and against calibrated ICL (icl+dev), plain and
with its own dev-prior calibration (+dev), and its agreement with the source's answers
(plain predictions)."""

from __future__ import annotations

from typing import Any

from vllm_deepthink.apps.results.columns import paired

BASES = ("source", "icl+dev")


def _variants(name: str, column: dict[str, Any]):
    yield name, column["predictions"]
    if "predictions_dev" in column:
        yield f"{name}+dev", column["predictions_dev"]


def update(data: dict[str, Any]) -> None:
    """Fill data["paired"] and data["agreement"] from data["columns"] (in place)."""
    labels, columns = data["labels"], data["columns"]
    source = columns.get("source")
    comparisons, agreement = {}, {}
    for name, column in columns.items():
        if "predictions" not in column or name in ("zero-shot", "icl", "icl+dev") \
                or name.startswith("source(table)"):
            continue
        for variant, preds in _variants(name, column):
            for base in BASES:
                if base in columns and variant != base:
                    comparisons[f"{variant} vs {base}"] = paired(
                        columns[base]["predictions"], preds, labels)
        if source is not None and name != "source":
            preds = column["predictions"]
            agreement[name] = sum(a == b for a, b in zip(preds, source["predictions"])) / len(preds)
    data["paired"], data["agreement"] = comparisons, agreement
