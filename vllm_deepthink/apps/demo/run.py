"""`build_demo`: the demo adapters of `make serve` and what each of them scores.

The demo manifest (examples/demo.jsonl, docs/building.md "The demo adapters") holds one
line per task: the recipe, recorded, with a small dev split and a capped T so that both
adapters build in a few minutes. `producers.deepthink.manifest.build_manifest` builds
the lines whose adapter is missing or was built from another line; then every adapter is
scored in the three modes of apps/eval (zero-shot, ICL, Deep-Thinking): on its dev split
(ICL and Deep-Thinking from the build's own record, zero-shot in one more pass over the
same rows, rebuilt from the record) and, held out, on the task's evaluation rows. The
scores are kept in OUT_DIR/_demo_summary.json under the digest of the adapter's manifest
line, so an unchanged adapter is not scored again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.eval.modes import ADAPTER_NAME, MODES

DEFAULT_MANIFEST = "examples/demo.jsonl"
SUMMARY_NAME = "_demo_summary.json"  # never an adapter name: those start alnum


@dataclass
class DemoRow:
    """One demo adapter: what was built (T of the iterations run, the kept candidate, L)
    and its accuracy per mode (MODES) on its dev split and on the task's evaluation
    split (`test`: {} when not scored)."""

    name: str
    task: str
    digest: str
    prefix_len: int
    selected_iteration: int
    iterations_run: int
    candidate: str
    dev_size: int
    dev: dict[str, float]
    test_split: str | None = None
    test_size: int = 0
    test: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoRow:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class DemoSummary:
    """The demo's adapters (`rows`, in manifest order), which of them this call built, and
    the seconds spent building and scoring."""

    out_dir: str
    rows: list[DemoRow]
    built: list[str]
    build_seconds: float
    score_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "built": self.built,
                "build_seconds": self.build_seconds, "score_seconds": self.score_seconds,
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        """One line per adapter: T, L, the candidate, accuracy in % per mode on dev and
        test (DT: Deep-Thinking with the kept T)."""
        head = (f"{'adapter':<14} {'T':>5} {'L':>4}  {'dev n':>5} {'0-shot':>6} {'ICL':>5} "
                f"{'DT':>5}  {'test n':>6} {'0-shot':>6} {'ICL':>5} {'DT':>5}  candidate")
        lines = [head]
        for r in self.rows:
            dev = " ".join(_pct(r.dev.get(m), w) for m, w in zip(MODES, (6, 5, 5)))
            test = " ".join(_pct(r.test.get(m), w) for m, w in zip(MODES, (6, 5, 5)))
            t = f"{r.selected_iteration}/{r.iterations_run}"
            lines.append(f"{r.name:<14} {t:>5} {r.prefix_len:>4}  {r.dev_size:>5} {dev}  "
                         f"{r.test_size or '':>6} {test}  {r.candidate}")
        built = ", ".join(self.built) or "none (all were built already)"
        lines.append(f"T: the kept iteration / iterations run (1 = ICL's K/V); accuracy in % "
                     f"on the dev split T was chosen on and on the held-out test rows. Built "
                     f"now: {built} ({self.build_seconds:.0f} s); scored in "
                     f"{self.score_seconds:.0f} s.")
        return "\n".join(lines)


def _pct(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{100 * value:.1f}':>{width}}"


def _dev_record(config) -> dict[str, float]:
    """ICL (iteration 1) and Deep-Thinking (the kept iteration) dev accuracy, from the
    build's selection record."""
    from vllm_deepthink.producers.deepthink.errors import BuildError

    selection = config.selection or {}
    if selection.get("select_on") != "dev":
        raise BuildError(f"the demo adapter {config.build_args.get('out')} was not selected on "
                         f"dev; a demo manifest line keeps \"select_on\" dev (the default)")
    kept = selection["t1_dev_acc"]
    if config.selected_iteration > 1:
        kept = next(e["dev_acc"] for e in config.selection_trace
                    if e["iteration"] == config.selected_iteration)
    return {"icl": selection["t1_dev_acc"], "deepthink": kept}


def score_adapter(model, tokenizer, entry, adapter, test: bool = True) -> DemoRow:
    """The DemoRow of `adapter`, built from the manifest line `entry`: zero-shot on its dev
    split (one pass; ICL and Deep-Thinking come from the record) and, with `test`, the
    three modes on the task's evaluation split."""
    from vllm_deepthink.apps.eval.evaluate import evaluate
    from vllm_deepthink.tasks.datasets import open_task
    from vllm_deepthink.tasks.scoring import HFScorer
    from vllm_deepthink.tasks.splits import dev_split_of

    config = adapter.config
    recorded = _dev_record(config)
    spec = entry.spec
    task = open_task(spec.get("task_dir"), spec.get("dataset"))
    scorer = HFScorer(model, {ADAPTER_NAME: adapter}, batch_size=spec.get("batch_size", 16))
    dev_rows = dev_split_of(task, config.task)
    zero_shot = evaluate(scorer, tokenizer, task, dev_rows, ["zero-shot"], adapter,
                         progress=False)["metrics"]["zero-shot"]["acc"]
    row = DemoRow(name=entry.name, task=task.name,
                  digest=config.build_args["manifest"]["digest"],
                  prefix_len=config.prefix_len, selected_iteration=config.selected_iteration,
                  iterations_run=config.iterations_run,
                  candidate=config.selection.get("selected", ""), dev_size=len(dev_rows),
                  dev={"zero-shot": zero_shot, **recorded})
    if test:
        rows = task.rows(task.eval_split)
        metrics = evaluate(scorer, tokenizer, task, rows, list(MODES), adapter,
                           progress=False)["metrics"]
        row.test_split, row.test_size = task.eval_split, len(rows)
        row.test = {m: metrics[m]["acc"] for m in MODES}
    return row


def _cached(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of a previous call, by digest (none when the file is missing or unreadable:
    they are only a cache)."""
    try:
        data = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
        return {r["digest"]: r for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def build_demo(model: str | Path, out_dir: str | Path = "adapters_store",
               manifest: str | Path = DEFAULT_MANIFEST, *, test: bool = True,
               threads: int | None = None, progress: bool = True) -> DemoSummary:
    """Build the adapters of the demo `manifest` for `model` into `out_dir`/NAME (those
    missing or built from another line; build_manifest, with `threads` torch threads) and
    score each (score_adapter; `test`: on the evaluation split too), reusing the scores of
    an unchanged adapter. Raises manifest.ManifestError for a manifest it cannot use and
    BuildError when a line fails to build (its error in the message)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_deepthink.format import DeepThinkAdapter
    from vllm_deepthink.producers.deepthink.errors import BuildError
    from vllm_deepthink.producers.deepthink.manifest import (BUILT, FAILED, build_manifest,
                                                            read_manifest)

    out_dir = Path(out_dir)
    entries = read_manifest(manifest, {"model": str(model)})
    started = time.perf_counter()
    built = build_manifest(manifest, out_dir, defaults={"model": str(model)}, threads=threads,
                           progress=progress, log_builds=progress)
    build_seconds = time.perf_counter() - started
    failed = built.of(FAILED)
    if failed:
        raise BuildError("demo adapters failed to build: " + "; ".join(
            f"{r.name} (line {r.line}): {r.error}" for r in failed))
    started = time.perf_counter()
    cached, rows, weights = _cached(out_dir), [], None
    for entry in entries:
        row = cached.get(entry.digest)
        if row is not None and bool(row.get("test")) == test:
            rows.append(DemoRow.from_dict(row))
            continue
        if weights is None:
            before = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            tokenizer = AutoTokenizer.from_pretrained(model)
            weights = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        if progress:
            print(f"[demo] scoring {entry.name}", flush=True)
        adapter = DeepThinkAdapter.from_pretrained(out_dir / entry.name)
        rows.append(score_adapter(weights, tokenizer, entry, adapter, test=test))
    if weights is not None:
        torch.set_num_threads(before)
    summary = DemoSummary(str(out_dir), rows, [r.name for r in built.of(BUILT)],
                          build_seconds, time.perf_counter() - started)
    tmp = out_dir / f".{SUMMARY_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / SUMMARY_NAME)
    return summary
