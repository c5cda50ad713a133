"""Many adapters from one manifest (`build_manifest`, what `vllm-deepthink build
--manifest` runs): one JSON object per line, `name` plus the keyword arguments of
`from_task.build_from_task` (`model`, `task_dir`, `dataset`, `shots_per_class`, `seed`,
..., `policy` as an object of SelectionPolicy's fields; `compress`, an object of
compress.CompressSettings' fields, compresses the built adapter:
compress.build_compressed_from_task); each adapter goes to
OUT_DIR/NAME, a store `vllm serve --deepthink-adapter-dir OUT_DIR` serves by name.

Resumable: an adapter that loads (config and weights, validated) and whose config
records the digest of the same line (`build_args["manifest"]`) is skipped; any other line
is built, into a temporary directory moved over OUT_DIR/NAME only once saved, so a failed
rebuild leaves the previous adapter as it was. A task that fails is reported with its
error and the others go on. The builds run in this process, in worker processes, or on
Ray actors (manifest_workers.py); this process checks, writes and reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vllm_deepthink.format import CONFIG_NAME, AdapterFormatError, DeepThinkAdapter
from vllm_deepthink.format.names import ADAPTER_NAME_RULE, is_adapter_name
from vllm_deepthink.producers.compress.from_task import CompressSettings
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.from_task import DTYPES, SELECT_ON
from vllm_deepthink.producers.deepthink.iteration import OPTIMIZERS, POSITION_MODES
from vllm_deepthink.producers.deepthink.selection import SelectionPolicy
from vllm_deepthink.tasks.task import SPLITS

SUMMARY_NAME = "_manifest_summary.json"  # never an adapter name: those start alnum
BUILT, SKIPPED, FAILED = "built", "skipped", "failed"

_INT, _NUMBER, _BOOL, _TEXT = "an integer", "a number", "true or false", "a string"
# A line's fields: build_from_task's keyword arguments (tests check they match its
# signature) and "compress" -> what each must be: a kind, or the tuple of its values.
BUILD_FIELDS: dict[str, Any] = {
    "model": _TEXT, "revision": _TEXT, "task_dir": _TEXT, "dataset": _TEXT,
    "demos_text": _TEXT, "shots_per_class": _INT, "seed": _INT, "search": _BOOL,
    "optimizer": OPTIMIZERS, "step_size": _NUMBER, "beta": _NUMBER, "eta": _NUMBER,
    "position_mode": POSITION_MODES, "policy": "an object", "select_on": SELECT_ON,
    "dev_size": _INT, "dev_split": SPLITS, "stratify_dev": _BOOL, "batch_size": _INT,
    "dtype": DTYPES, "compress": "an object",
}
_POLICY_FIELDS = {"max_iterations": _INT, "min_iterations": _INT, "patience": _INT,
                  "guard_k": _NUMBER, "collapse_drop": _NUMBER, "collapse_span": _INT}
_NEVER = ("patience", "collapse_drop")  # null: no patience stop, no collapse stop
# Values naming a local file or directory, made absolute for the workers (whose working
# directory may differ); a dataset that is not a local path is a hub name.
_PATH_FIELDS = ("model", "task_dir", "dataset")


class ManifestError(BuildError):
    """A manifest (or a line of it) that cannot be used; raised before any build."""


def _is_kind(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return value in kind
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _TEXT:
        return isinstance(value, str) and value != ""
    return isinstance(value, dict)


def _check_fields(data: dict, kinds: dict[str, Any], where: str,
                  nullable: tuple[str, ...] = ()) -> dict:
    """`data` without its nulls (a null is the default, except for a `nullable` field,
    where it means "never"), every field known and of its kind, else ManifestError
    naming `where` and the field (in double quotes, as in the line: a backticked name
    would read as the command's flag)."""
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r}; expected some of "
                            f"{sorted(kinds)}")
    for key, value in data.items():
        kind = kinds[key]
        if value is not None and not _is_kind(value, kind):
            expected = f"one of {list(kind)}" if isinstance(kind, tuple) else kind
            raise ManifestError(f"{where}: \"{key}\" must be {expected}, found {value!r}")
    return {k: v for k, v in data.items() if v is not None or k in nullable}


@dataclass(frozen=True)
class ManifestEntry:
    """One line: its number (from 1), `name`, and `spec` (the build_from_task keyword
    arguments of the line over the command's defaults), whose digest a finished adapter
    records."""
    line: int
    name: str
    spec: dict[str, Any]

    @property
    def digest(self) -> str:
        text = json.dumps({"name": self.name, **self.spec}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def job(self, out: Path) -> dict[str, Any]:
        """What a worker needs (picklable): build_from_task's arguments, local paths made
        absolute, the provenance the adapter records."""
        kwargs = dict(self.spec)
        for key in _PATH_FIELDS:
            if key in kwargs and Path(kwargs[key]).expanduser().exists():
                kwargs[key] = str(Path(kwargs[key]).expanduser().resolve())
        if "compress" in kwargs:  # the build's seed and batch size unless it sets its own
            kwargs["compress"] = {"seed": self.spec.get("seed", 0),
                                  "batch_size": self.spec.get("batch_size", 16),
                                  **kwargs["compress"]}
        kwargs["build_args"] = {**self.spec, "out": str(out),
                                "manifest": {"line": self.line, "digest": self.digest}}
        return {"name": self.name, "line": self.line, "kwargs": kwargs}


def parse_line(text: str, line: int, defaults: dict[str, Any] | None = None,
               source: str = "manifest") -> ManifestEntry:
    """One manifest line (JSON) over `defaults` (fields of every line, e.g. `model`),
    checked field by field; ManifestError names `source`, the line and the field."""
    where = f"{source} line {line}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); expected "
                            f"one object per line, e.g. {{\"name\": \"sst2-s0\", "
                            f"\"task_dir\": \"examples/data/sst2\", \"seed\": 0}}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(data).__name__}")
    name = data.pop("name", None)
    if not is_adapter_name(name):
        raise ManifestError(f"{where}: \"name\" must be {ADAPTER_NAME_RULE} (the adapter's "
                            f"directory in the output and its name when served), found "
                            f"{name!r}")
    spec = {**_check_fields(dict(defaults or {}), BUILD_FIELDS, "the command's defaults"),
            **_check_fields(data, BUILD_FIELDS, where)}
    if "model" not in spec:
        raise ManifestError(f"{where}: no \"model\": give it in the line, or `model` once "
                            f"for every line")
    if "policy" in spec:
        policy = {**_check_fields(dict((defaults or {}).get("policy") or {}), _POLICY_FIELDS,
                                  "the command's policy", _NEVER),
                  **_check_fields(data.get("policy") or {}, _POLICY_FIELDS, f"{where}: policy",
                                  _NEVER)}
        try:
            SelectionPolicy(**policy)
        except ValueError as exc:
            raise ManifestError(f"{where}: \"policy\": {exc}") from None
        spec["policy"] = policy
    if "compress" in spec:
        try:
            CompressSettings.from_dict(spec["compress"], "\"compress\"").check(
                has_task=bool(spec.get("task_dir") or spec.get("dataset")))
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"{where}: \"compress\": {exc}") from None
    return ManifestEntry(line, name, spec)


def read_manifest(path: str | Path, defaults: dict[str, Any] | None = None
                  ) -> list[ManifestEntry]:
    """Every line of the JSONL file at `path` (blank lines skipped), checked before any
    build: fields (parse_line) and names (each once: one adapter directory per name)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"`manifest` {path}: no such file; expected a JSONL file, one "
                            f"task per line")
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            entry = parse_line(text, number, defaults, source=str(path))
            if entry.name in seen:
                raise ManifestError(f"{path} line {number}: \"name\" {entry.name!r} is already "
                                    f"the name of line {seen[entry.name]}; each adapter needs "
                                    f"its own name")
            seen[entry.name] = number
            entries.append(entry)
    if not entries:
        raise ManifestError(f"`manifest` {path} has no task; expected one JSON object per "
                            f"line")
    return entries


def finished_state(out: Path, entry: ManifestEntry) -> str | None:
    """None when OUT_DIR/NAME holds a loadable adapter built from this very line, else
    why it is built (again)."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        return "not a directory"
    try:
        config = DeepThinkAdapter.from_pretrained(out).config
    except (AdapterFormatError, OSError, ValueError) as exc:
        return f"not loadable ({str(exc)[:200]})"
    recorded = (config.build_args or {}).get("manifest") or {}
    return None if recorded.get("digest") == entry.digest else "built from another line"


def _ours(out: Path) -> bool:
    """Whether a build may replace `out`: missing, empty, or an adapter directory."""
    return not out.exists() or (out.is_dir() and (
        (out / CONFIG_NAME).is_file() or not any(out.iterdir())))


def store(adapter: DeepThinkAdapter, out: Path) -> None:
    """Save into a temporary sibling directory, then move it over `out` (a reader sees
    the old adapter or the new one, never half of either)."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    adapter.save_pretrained(tmp)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class TaskResult:
    name: str
    line: int
    status: str                 # built / skipped / failed
    seconds: float              # the build (in its worker), or the check of a skip
    out: str
    reason: str | None = None   # why it was built: new / built from another line / ...
    error: str | None = None
    prefix_len: int | None = None
    selected_iteration: int | None = None


@dataclass
class ManifestSummary:
    manifest: str
    out_dir: str
    workers: int
    threads: int | None          # torch threads per worker
    ray: bool
    wall_seconds: float = 0.0
    results: list[TaskResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def of(self, status: str) -> list[TaskResult]:
        return [r for r in self.results if r.status == status]

    @property
    def adapters_per_hour(self) -> float | None:
        """Adapters built per hour of this run's wall time (model loads included)."""
        built = len(self.of(BUILT))
        return 3600.0 * built / self.wall_seconds if built and self.wall_seconds else None

    def to_dict(self) -> dict[str, Any]:
        counts = {s: len(self.of(s)) for s in (BUILT, SKIPPED, FAILED)}
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "results"},
                "counts": counts, "adapters_per_hour": self.adapters_per_hour,
                "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        """Per status: count, seconds in all and per task; then every failure."""
        lines = [f"{'status':<8} {'tasks':>6} {'seconds':>10} {'s/task':>8}"]
        for status in (BUILT, SKIPPED, FAILED):
            done = self.of(status)
            total = sum(r.seconds for r in done)
            lines.append(f"{status:<8} {len(done):>6} {total:>10.1f} "
                         f"{total / len(done) if done else 0:>8.1f}")
        rate = self.adapters_per_hour
        lines.append(f"wall {self.wall_seconds:.1f} s, {self.workers} worker(s)"
                     f"{' on Ray' if self.ray else ''}"
                     + (f", {rate:.0f} adapters/hour" if rate else ""))
        lines += [f"failed: {r.name} (line {r.line}): {r.error}" for r in self.of(FAILED)]
        return "\n".join(lines)


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "loadavg": list(load) if load else None}


def default_threads(workers: int) -> int | None:
    """Torch threads per local worker: the cores this process may use shared among them
    (None for one worker in this process: torch's own default)."""
    if workers == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def build_manifest(manifest: str | Path, out_dir: str | Path, *,
                   defaults: dict[str, Any] | None = None, workers: int = 1,
                   threads: int | None = None, ray: bool = False,
                   ray_address: str | None = None, progress: bool = True,
                   log_builds: bool = False) -> ManifestSummary:
    """Build every task of `manifest` (read_manifest; `defaults` apply to every line,
    e.g. {"model": ...}) into `out_dir`/NAME, skipping those already built from the same
    line, with `workers` processes (1: in this process) or, with `ray`, `workers` Ray
    actors (`ray_address`: ray.init's address; default a local instance, or the one this
    process already joined). Each worker opens its base model once and sets `threads`
    torch threads (default: the cores shared among the workers). A failed task is
    reported in the summary, never raised; ManifestError is raised for a manifest that
    cannot be used, before any build. `log_builds` (one worker in this process only)
    reports every build's iterations on stderr. The summary is also written to
    `out_dir`/_manifest_summary.json."""
    from tqdm.auto import tqdm

    from vllm_deepthink.producers.deepthink import manifest_workers

    if workers < 1:
        raise ManifestError(f"`workers` must be >= 1, found {workers}")
    if threads is not None and threads < 1:
        raise ManifestError(f"`threads` must be >= 1, found {threads}")
    entries = read_manifest(manifest, defaults)
    out_dir = Path(out_dir).resolve()  # never read as a hub id
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is None and not ray:
        import torch

        threads = default_threads(workers) or torch.get_num_threads()
    summary = ManifestSummary(str(manifest), str(out_dir), workers, threads, ray)
    summary.machine["at_start"] = _machine()
    started = time.perf_counter()
    bar = tqdm(total=len(entries), desc="adapters", unit="adapter", disable=not progress,
               file=sys.stderr)

    def report(result: TaskResult) -> None:
        summary.results.append(result)
        bar.update(1)
        bar.set_postfix({s: len(summary.of(s)) for s in (BUILT, SKIPPED, FAILED)})
        if result.status == FAILED:
            bar.write(f"{result.name} (line {result.line}) failed: {result.error}",
                      file=sys.stderr)

    todo: dict[str, tuple[ManifestEntry, str]] = {}
    for entry in entries:
        out, t0 = out_dir / entry.name, time.perf_counter()
        reason = finished_state(out, entry)
        if reason is None:
            report(TaskResult(entry.name, entry.line, SKIPPED, time.perf_counter() - t0,
                              str(out)))
        elif not _ours(out):
            report(TaskResult(entry.name, entry.line, FAILED, 0.0, str(out), reason,
                              error=f"{out} exists and is not an adapter directory; move "
                                    f"it away or give the task another \"name\""))
        else:
            todo[entry.name] = (entry, reason)

    def done(name: str, adapter: DeepThinkAdapter | None, seconds: float,
             error: str | None) -> None:
        entry, reason = todo[name]
        out = out_dir / name
        result = TaskResult(name, entry.line, FAILED, seconds, str(out), reason, error)
        if adapter is not None:
            try:
                store(adapter, out)
                result.status = BUILT
                result.prefix_len = adapter.config.prefix_len
                result.selected_iteration = adapter.config.selected_iteration
            except (AdapterFormatError, OSError) as exc:
                result.error = f"saving to {out} failed: {exc}"
        report(result)

    jobs = [entry.job(out_dir / entry.name) for entry, _ in todo.values()]
    try:
        if jobs and ray:
            summary.threads = manifest_workers.run_ray(jobs, done, workers=workers,
                                                       threads=threads, address=ray_address)
        elif jobs:
            manifest_workers.run_local(jobs, done, workers=workers, threads=threads,
                                       log_builds=log_builds)
    finally:
        bar.close()
        summary.wall_seconds = time.perf_counter() - started
        summary.machine["at_end"] = _machine()
        summary.results.sort(key=lambda r: r.line)
        write_summary(summary, out_dir / SUMMARY_NAME)
    return summary


def write_summary(summary: ManifestSummary, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
