"""The files of the results table: row JSONs (OUT/json/ROW.json, written atomically) and
the checkpoints of a row being computed (`RowCheckpoints`, OUT/work/ROW/).

Checkpoints: zero-shot.json, icl.json + icl.safetensors (iteration 1, shared by every
candidate), cand-NN.json + cand-NN.safetensors (each finished search candidate: its
trace, dev result and best K/V), so an interrupted row resumes at its next candidate;
cand-NN.partial.json (the running candidate's dev result and, for the published-default
run, test trace at every iteration scored so far), so a candidate interrupted mid-run
resumes after its last scored iteration, its K/V recomputed by running the optimizer
that far (runs.replay_kv). Their names and content are a contract: a row started by an
earlier version resumes with this one. The JSON files are the checkpoint; the
.safetensors files only save time: where one is missing (the JSON files copied or
committed to continue a row on another machine), its K/V are recomputed and saved again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vllm_deepthink.apps.results.specs import RowSpec


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over `path`
    (a reader never sees half a file; an interrupted write leaves no row behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_kv(path: Path, keys, values) -> None:
    from safetensors.torch import save_file

    tensors = {f"k.{i}": k.contiguous() for i, k in enumerate(keys)}
    tensors.update({f"v.{i}": v.contiguous() for i, v in enumerate(values)})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_kv(path: Path):
    """(keys, values) saved by _save_kv, or (None, None) when the file is missing."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None, None
    tensors = load_file(str(path))
    n = len(tensors) // 2
    return [tensors[f"k.{i}"] for i in range(n)], [tensors[f"v.{i}"] for i in range(n)]


def row_path(out: Path, spec: RowSpec) -> Path:
    return out / "json" / f"{spec.key}.json"


def work_dir(out: Path, spec: RowSpec) -> Path:
    """The row's checkpoints (removed once the row is written, unless --skip-search)."""
    return out / "work" / spec.key


def row_state(out: Path, spec: RowSpec, with_search: bool = True) -> str:
    """"done", "done without search" (a --skip-search row; the full run adds the search
    column from its checkpoints), "partial" or "to do"."""
    path = row_path(out, spec)
    if path.is_file():
        skipped = json.loads(path.read_text()).get("search") == "skipped"
        if not skipped:
            return "done"
        return "partial (no search)" if with_search else "done without search"
    work = work_dir(out, spec)
    return "partial" if work.is_dir() and any(work.iterdir()) else "to do"


class RowCheckpoints:
    """The checkpoints of one row (file names and content: see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def load_zero_shot(self) -> list[list[float]] | None:
        path = self.dir / "zero-shot.json"
        return json.loads(path.read_text())["scores"] if path.is_file() else None

    def save_zero_shot(self, scores, seconds: float) -> None:
        write_json_atomic(self.dir / "zero-shot.json",
                          {"scores": [[s for s, _ in i] for i in scores], "seconds": seconds})

    def load_icl(self):
        """Iteration 1 as candidates.run_candidates takes it back: (dev result, K, V); K and
        V are None when icl.safetensors is missing (run_grid recomputes them)."""
        from vllm_deepthink.producers.deepthink import dev_scoring

        if not (self.dir / "icl.json").is_file():
            return None
        saved = json.loads((self.dir / "icl.json").read_text())
        keys, values = _load_kv(self.dir / "icl.safetensors")
        return dev_scoring.DevResult.from_dict(saved["dev"]), keys, values

    def save_icl_once(self, icl) -> None:
        if not (self.dir / "icl.json").is_file():
            self.save_icl_kv(icl[1], icl[2])
            write_json_atomic(self.dir / "icl.json", {"dev": icl[0].to_dict()})

    def load_candidate(self, index: int, candidate):
        """(the finished run, its test trace and trace scores) or None; the run's keys
        and values are None when cand-NN.safetensors is missing (run_grid recomputes
        them)."""
        from vllm_deepthink.producers.deepthink import candidates, dev_scoring

        path = self.dir / f"cand-{index:02d}.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved["candidate"] != candidate.to_dict():
            return None  # another grid's candidate at this index: run this one
        run = candidates.CandidateRun(candidate, trace=saved["trace"],
                                      stopped=saved["stopped"],
                                      best_iteration=saved["best_iteration"],
                                      best=dev_scoring.DevResult.from_dict(saved["best"]),
                                      seconds=saved["seconds"])
        run.keys, run.values = _load_kv(self.dir / f"cand-{index:02d}.safetensors")
        return run, saved["test_trace"], saved["test_trace_scores"]

    def save_icl_kv(self, keys, values) -> None:
        _save_kv(self.dir / "icl.safetensors", keys, values)

    def save_candidate_kv(self, index: int, run) -> None:
        _save_kv(self.dir / f"cand-{index:02d}.safetensors", run.keys, run.values)

    def save_candidate(self, index: int, run, test_trace, test_trace_scores) -> None:
        self.save_candidate_kv(index, run)
        write_json_atomic(self.dir / f"cand-{index:02d}.json",
                          {"candidate": run.candidate.to_dict(), "trace": run.trace,
                           "stopped": run.stopped, "best_iteration": run.best_iteration,
                           "best": run.best.to_dict(), "seconds": run.seconds,
                           "test_trace": test_trace, "test_trace_scores": test_trace_scores})
        (self.dir / f"cand-{index:02d}.partial.json").unlink(missing_ok=True)

    def load_partial(self, index: int, candidate) -> dict[str, Any]:
        """The scored iterations of an interrupted run of this candidate: {"dev": dev
        results, "test_trace", "test_trace_scores", "seconds"} (empty lists if none)."""
        path = self.dir / f"cand-{index:02d}.partial.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved["candidate"] != candidate.to_dict():
            return {"dev": [], "test_trace": [], "test_trace_scores": [], "seconds": 0.0}
        return saved

    def save_partial(self, index: int, candidate, partial: dict[str, Any]) -> None:
        write_json_atomic(self.dir / f"cand-{index:02d}.partial.json",
                          {"candidate": candidate.to_dict(), **partial})

