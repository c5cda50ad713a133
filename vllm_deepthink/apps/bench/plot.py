"""PNGs of the benchmark: requests/s of every system relative to `icl-apc`
(`plot_reports`); with compressed adapters, requests/s and tasks per GiB against the
adapter length k (`plot_compressed`, `--against-k`); the scale mode's (`plot_scale`).

`plot_reports`: one panel per (workload kind, prefix length); x = number of tasks; one line per
system; the dashed line at 1 is `icl-apc` itself. Every ratio is taken within one
run (one workload of one benchmark invocation), so reports of several invocations
can share a plot:

    python -m vllm_deepthink.apps.bench.plot results/bench.json results/bench-prefix.json \
        --out results/bench-all.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SYSTEM_STYLE = {
    "deepthink": ("tab:red", "o"),
    "icl-apc": ("tab:blue", "s"),
    "icl-no-apc": ("tab:cyan", "v"),
    "zero-shot": ("tab:gray", "^"),
    "hf-reference": ("tab:green", "D"),
}


def plot_ratios(report: dict[str, Any], path: str | Path) -> Path:
    return plot_reports([report], path)


def plot_reports(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """Where two reports measured the same system on the same workload, the later wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, int, int], dict[str, dict[int, float]]] = {}
    for run in (run for report in reports for run in report["runs"]):
        w = run["workload"]
        base = run["systems"].get("icl-apc", {}).get("requests_per_s")
        if not base:
            continue
        panel = panels.setdefault((w["kind"], w["output_len"], w["prefix_len"]), {})
        for name, fig in run["systems"].items():
            if fig.get("requests_per_s"):
                panel.setdefault(name, {})[w["num_tasks"]] = fig["requests_per_s"] / base
    if not panels:
        raise ValueError("no run has an icl-apc figure to normalise by; nothing to plot")
    keys = sorted(panels)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 4.6 * cols), 3.6 * rows + 0.6),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        kind, output_len, prefix_len = key
        for name, points in sorted(panels[key].items()):
            color, marker = SYSTEM_STYLE.get(name, ("black", "x"))
            tasks = sorted(points)
            ax.plot(tasks, [points[t] for t in tasks], marker=marker, color=color, label=name)
        ax.axhline(1.0, color="tab:blue", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        all_tasks = sorted({t for p in panels[key].values() for t in p})
        ax.set_xticks(all_tasks, [str(t) for t in all_tasks])
        ax.set_title(f"{kind} (out={output_len}), prefix {prefix_len}")
        ax.set_xlabel("tasks (adapters)")
        ax.set_ylabel("requests/s ÷ icl-apc")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes.flat[0].legend(handles.values(), handles.keys(), fontsize=8)
    env = reports[0].get("environment", {})
    fig.suptitle(f"vllm-deepthink: requests/s relative to icl-apc\n"
                 f"{reports[0]['settings']['model']}, "
                 f"{env.get('cpu_affinity')} CPUs, vLLM {env.get('vllm_version')}", fontsize=9)
    return _save(fig, path)


def plot_compressed(reports: dict[str, Any] | list[dict[str, Any]], path: str | Path) -> Path:
    """`bench --adapter-len`: requests/s against the adapter length k (top row: one panel
    per workload kind and prefix length L, one colour per number of tasks; icl-apc dashed
    and zero-shot dotted at their level in the same colour) and tasks per GiB of KV
    cache against k at each block size of the memory section (bottom row, icl-apc
    dashed). Several reports share a figure (the later wins on the same point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vllm_deepthink.apps.bench.memory import GIB, adapter_len_of

    reports = [reports] if isinstance(reports, dict) else reports
    speed: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = {}
    for run in (run for report in reports for run in report["runs"]):
        w = run["workload"]
        panel = speed.setdefault((w["kind"], w["output_len"], w["prefix_len"]), {})
        row = panel.setdefault(w["num_tasks"], {"k": {}})
        for name, fig in run["systems"].items():
            rps = fig.get("requests_per_s")
            k = adapter_len_of(name, w["prefix_len"])
            if rps and k is not None:
                row["k"][k] = rps
            elif rps and name in ("icl-apc", "zero-shot"):
                row[name] = rps
    speed = {key: panel for key, panel in speed.items()
             if any(row["k"] for row in panel.values())}
    if not speed:
        raise ValueError("no run has a deepthink-k<k> figure; nothing to plot against k")
    fit: dict[int, dict[int, dict[Any, float]]] = {}
    cache_gib = None
    for report in reports:
        memory = report.get("memory") or {}
        cache_gib = memory.get("kv_cache_bytes", 2 * GIB) / GIB
        for e in memory.get("entries", []):
            k = adapter_len_of(e["system"], e["prefix_len"])
            for b in e["by_block_size"]:
                if b["tasks_per_gib"] is None:
                    continue
                points = fit.setdefault(e["prefix_len"], {}).setdefault(b["block_size"], {})
                if k is not None:
                    points[k] = b["tasks_per_gib"]
                elif e["system"] == "icl-apc":
                    points["icl-apc"] = b["tasks_per_gib"]
    keys = sorted(speed)
    cols = max(len(keys), len(fit), 1)
    fig, axes = plt.subplots(2, cols, figsize=(max(6.4, 4.4 * cols), 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_tasks = sorted({t for panel in speed.values() for t in panel})
    color_of = {t: colors[i % len(colors)] for i, t in enumerate(all_tasks)}
    for ax, key in zip(axes[0], keys):
        kind, output_len, prefix_len = key
        ks_all = set()
        for tasks, row in sorted(speed[key].items()):
            ks = sorted(row["k"])
            ks_all.update(ks)
            c = color_of[tasks]
            ax.plot(ks, [row["k"][k] for k in ks], marker="o", color=c,
                    label=f"deepthink-k, {tasks} tasks")
            if "icl-apc" in row:
                ax.axhline(row["icl-apc"], color=c, linestyle="--", linewidth=0.9)
            if "zero-shot" in row:
                ax.axhline(row["zero-shot"], color=c, linestyle=":", linewidth=0.9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ks_all), [str(k) for k in sorted(ks_all)])
        ax.set_ylim(bottom=0)
        ax.set_title(f"{kind} (out={output_len}), L={prefix_len}\n"
                     f"dashed: icl-apc at L, dotted: zero-shot", fontsize=9)
        ax.set_xlabel("adapter length k (positions)")
        ax.set_ylabel("requests/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes[0])[len(keys):]:
        ax.axis("off")
    block_colors = {16: "tab:red", 128: "tab:purple"}
    for ax, (prefix_len, by_block) in zip(axes[1], sorted(fit.items())):
        ks_all = set()
        for block_size, points in sorted(by_block.items()):
            c = block_colors.get(block_size, "black")
            ks = sorted(k for k in points if k != "icl-apc")
            ks_all.update(ks)
            ax.plot(ks, [points[k] for k in ks], marker="o", color=c,
                    label=f"deepthink-k, block {block_size}")
            if "icl-apc" in points:
                ax.axhline(points["icl-apc"], color=c, linestyle="--", linewidth=0.9,
                           label=f"icl-apc at L, block {block_size}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(ks_all), [str(k) for k in sorted(ks_all)])
        ax.set_title(f"tasks whose prefixes fit {cache_gib:g} GiB of KV cache, per GiB; "
                     f"L={prefix_len}", fontsize=9)
        ax.set_xlabel("adapter length k (positions)")
        ax.set_ylabel("tasks per GiB")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes[1])[len(fit):]:
        ax.axis("off")
    env = reports[0].get("environment", {})
    fig.suptitle(f"vllm-deepthink: compressed adapters (k positions) vs ICL (L positions)\n"
                 f"{reports[0]['settings']['model']}, {env.get('cpu_affinity')} CPUs, "
                 f"vLLM {env.get('vllm_version')}", fontsize=9)
    return _save(fig, path)


def plot_scale(report: dict[str, Any], path: str | Path) -> Path:
    """`bench --scale`: requests/s (left) and p99 TTFT (right) of each system against the
    number of registered adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict[str, float]]] = {}
    for n, systems in report["runs"].items():
        for name, fig in systems.items():
            if fig.get("request_throughput"):
                series.setdefault(name, {})[int(n)] = fig
    if not series:
        raise ValueError("no (N, system) of the scale report has a request_throughput")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in sorted(series.items()):
        color, marker = SYSTEM_STYLE.get(name, ("black", "x"))
        ns = sorted(points)
        for ax, key in zip(axes, ("request_throughput", "p99_ttft_ms")):
            ax.plot(ns, [points[n][key] for n in ns], marker=marker, color=color, label=name)
    all_ns = sorted({n for points in series.values() for n in points})
    for ax, label in zip(axes, ("requests/s", "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ns, [str(n) for n in all_ns])
        ax.set_xlabel("registered adapters (Zipf popularity)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s, env = report["settings"], report.get("environment", {})
    fig.suptitle(f"vllm-deepthink --scale: {Path(s['model']).name}, L={s['prefix_len']}, "
                 f"query {s['query_len']}, out {s['output_len']}, Zipf({s['zipf_s']}), "
                 f"{s['plain_share']:.0%} plain, KV {s['kv_cache_gib']} GiB, resident "
                 f"{s['resident_gib']} GiB, {env.get('cpu_affinity')} CPUs", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", help="JSON files written by `bench --output-json`")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--against-k", action="store_true",
                        help="requests/s and tasks per GiB against the adapter length k "
                             "(reports of `bench --adapter-len`)")


def main(args: argparse.Namespace) -> None:
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    draw = plot_compressed if args.against_k else plot_reports
    print(f"wrote {draw(reports, args.out)}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(_parser)
    main(_parser.parse_args())
