"""The package's shape is a contract: which folder may import which, and that the
format, tasks and producers run without vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "vllm_deepthink"

# Top-level folder -> the folders it may import (directly or lazily inside functions).
ALLOWED = {
    "format": set(),
    "tasks": {"format"},
    "producers": {"format", "tasks"},
    "plugin": {"format", "tasks"},  # the vLLM consumer never imports a producer
    "apps": {"format", "tasks", "producers", "plugin", "tools"},
    "tools": set(),
    "": {"format", "plugin"},  # vllm_deepthink/__init__.py: lazy public names
}


def module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(nodes) -> set[str]:
    """Our modules that these import statements need: `from pkg import mod` needs mod
    (pkg is loaded anyway), `from mod import name` needs mod."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules or {node.module})
    # Every module is loaded after the root package; it is not a dependency.
    return (found & MODULES.keys()) - {"vllm_deepthink"}


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> our modules it imports (at module level, or anywhere)."""
    edges = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges[name] = imported(tree.body if module_level_only else ast.walk(tree)) - {name}
    return edges


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_folders_import_only_what_they_may():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            src, dst = folder(module), folder(target)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{module} imports {target} ({src or 'top'} -> {dst})")
    assert not wrong, "import boundaries crossed:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "any"])
def test_imports_have_no_cycle(module_level_only):
    """Imports between our modules form a DAG, counting imports inside functions too
    (a lazy import that closes a cycle still hides a tangled design)."""
    edges = graph(module_level_only)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.subprocess
def test_format_tasks_and_producers_run_without_vllm(tmp_path):
    """With `vllm` unimportable, every module of format/, tasks/ and producers/ imports,
    and a tiny Deep-Thinking build and an HF score run."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        sys.modules["vllm"] = None  # any `import vllm` now raises ImportError
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import vllm_deepthink
        for package in ("format", "tasks", "producers"):
            pkg = importlib.import_module("vllm_deepthink." + package)
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(info.name)
        from tests.helpers.tiny_models import load_tiny
        from vllm_deepthink import DeepThinkAdapter
        from vllm_deepthink.producers.deepthink.builder import build_adapter
        from vllm_deepthink.tasks.scoring import ChoiceItem, accuracy, score_items_hf
        model, tokenizer = load_tiny("llama", {str(tmp_path / "llama")!r})
        items = [ChoiceItem("Review: fine\\nSentiment:", [" good", " bad"], 0)] * 3
        adapter = build_adapter(model, tokenizer, "Review: great\\nSentiment: good",
                                iterations=3, dev_items=items, progress=False)
        adapter.save_pretrained({str(tmp_path / "adapter")!r})
        loaded = DeepThinkAdapter.from_pretrained({str(tmp_path / "adapter")!r})
        scores = score_items_hf(model, tokenizer, items,
                                past_key_values=loaded.as_past_key_values())
        assert accuracy(scores, [0, 0, 0])["n"] == 3
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules
                       if sys.modules[m] is not None)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]

