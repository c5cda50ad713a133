"""PEFT prompt-learning adapters imported as KV prefixes, against PEFT's own forward (HF,
no engine): every type on tiny Llama (GQA, RoPE) and tiny GPT-2 (learned positions),
the BOS policy, provenance, and every refusal with its reason."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

peft = pytest.importorskip("peft")

from tests.helpers import REPO_ROOT  # noqa: E402
from tests.helpers.references import hf_reference, max_abs_diff  # noqa: E402
from tests.helpers.peft_adapters import (KINDS, METHODS, load_reference_model,  # noqa: E402
                                         make_peft_adapter, peft_reference)
from tests.helpers.tiny_models import load_tiny, make_tiny_model  # noqa: E402
from vllm_deepthink.format import (PLACEHOLDER_TOKEN_ID, DeepThinkAdapter,  # noqa: E402
                                   ModelFingerprint)
from vllm_deepthink.producers.kv_import import ImportRefusedError  # noqa: E402
from vllm_deepthink.producers.peft import import_peft_adapter  # noqa: E402

TOLERANCE = 1e-4
QUERY = "Review: contains no wit , only labored gags\nSentiment:"
P = 5


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tiny_gpt2_dir):
    out = {}
    for family, directory in (("llama", tiny_llama_dir), ("gpt2", tiny_gpt2_dir)):
        model, tokenizer = load_tiny(family, directory)
        out[family] = (directory, model, tokenizer)
    return out


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """One saved PEFT adapter per (family, kind)."""
    root = tmp_path_factory.mktemp("peft")
    return {(family, kind): make_peft_adapter(bases[family][0], kind, root / f"{family}-{kind}",
                                              num_virtual_tokens=P, seed=i)
            for family in bases for i, kind in enumerate(KINDS)}


def query_ids(tokenizer, special: bool) -> list[int]:
    return tokenizer(QUERY, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_prefix_reproduces_peft_model(bases, adapters, family, kind):
    model_dir, model, tokenizer = bases[family]
    task_id = 1 if kind == "multitask" else None
    adapter = import_peft_adapter(adapters[family, kind], model_dir, task_id=task_id)
    config = adapter.config
    bos = tokenizer.bos_token_id
    virtual = peft_config_json(adapters[family, kind])["num_virtual_tokens"]  # CPT: its text
    assert config.method == METHODS[kind]
    assert (config.num_virtual_tokens, config.prefix_special_ids) == (virtual, [bos])
    assert config.prefix_len == virtual + 1
    assert config.placeholder_token_ids() == [PLACEHOLDER_TOKEN_ID] * virtual + [bos]

    plain = query_ids(tokenizer, special=False)
    served = hf_reference(model, adapter, plain, num_greedy=8)   # what the server computes
    peft_model = load_reference_model(model_dir, adapters[family, kind])
    ours_ids = query_ids(tokenizer, special=True)                 # PeftModel(tokenizer(text))
    assert ours_ids == [bos] + plain
    reference = peft_reference(peft_model, ours_ids, 1, task_id=task_id)
    diff = max_abs_diff(served.prompt_logprobs, reference.prompt_logprobs)
    print(f"[peft parity HF] {family} {kind}: L={config.prefix_len} max |dlogprob| {diff:.2e}")
    assert diff <= TOLERANCE
    assert served.greedy_tokens == reference.greedy_tokens
    # The adapter matters: the plain model is far from it.
    assert max_abs_diff(hf_reference(model, None, ours_ids, num_greedy=0).prompt_logprobs[1:],
                        reference.prompt_logprobs) > 0.05


def peft_config_json(adapter_dir) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_special_tokens_the_prefix_is_the_virtual_tokens(bases, adapters, family):
    model_dir, model, tokenizer = bases[family]
    for kind in ("prefix", "prompt"):
        adapter = import_peft_adapter(adapters[family, kind], model_dir,
                                      query_special_tokens="none")
        assert adapter.prefix_len == P and adapter.config.prefix_special_ids == []
        assert adapter.config.placeholder_token_ids() == [PLACEHOLDER_TOKEN_ID] * P
        plain = query_ids(tokenizer, special=False)
        reference = peft_reference(load_reference_model(model_dir, adapters[family, kind]),
                                   plain, 0)
        served = hf_reference(model, adapter, plain, num_greedy=8)
        assert max_abs_diff(served.prompt_logprobs, reference.prompt_logprobs) <= TOLERANCE
        assert served.greedy_tokens == reference.greedy_tokens
        # The BOS policy matters: the "auto" prefix answers PeftModel(tokenizer(text)),
        # which differs from PeftModel on ids without BOS.
        with_bos = import_peft_adapter(adapters[family, kind], model_dir)
        assert max_abs_diff(hf_reference(model, with_bos, plain, num_greedy=0).prompt_logprobs,
                            reference.prompt_logprobs) > 0.05


def test_multitask_imports_one_adapter_per_task(bases, adapters):
    model_dir, model, tokenizer = bases["llama"]
    plain = query_ids(tokenizer, special=False)
    one, two = (import_peft_adapter(adapters["llama", "multitask"], model_dir, task_id=t)
                for t in (0, 2))
    assert one.config.provenance["task_id"] == 0 and two.config.provenance["task_id"] == 2
    assert max_abs_diff(hf_reference(model, one, plain, num_greedy=0).prompt_logprobs,
                        hf_reference(model, two, plain, num_greedy=0).prompt_logprobs) > 0.01


def test_provenance_and_round_trip(bases, adapters, tmp_path):
    model_dir, _, tokenizer = bases["llama"]
    source = adapters["llama", "prefix-proj"]
    adapter = import_peft_adapter(source, model_dir)
    record = adapter.config.provenance
    digest = lambda name: hashlib.sha256((source / name).read_bytes()).hexdigest()  # noqa: E731
    assert record["files"] == {"adapter_config.json": digest("adapter_config.json"),
                               "adapter_model.safetensors": digest("adapter_model.safetensors")}
    assert record["peft_version"] == peft.__version__ and record["peft_type"] == "PREFIX_TUNING"
    assert record["prefix_projection"] is True and record["num_virtual_tokens"] == P
    assert record["query_special_tokens"] == "auto" and record["source"] == "peft"
    assert record["base_model_name_or_path"] == str(model_dir)
    assert adapter.config.demo_token_ids is None and adapter.config.dtype == "float32"
    adapter.save_pretrained(tmp_path / "imported")
    loaded = DeepThinkAdapter.from_pretrained(
        tmp_path / "imported", expected_fingerprint=ModelFingerprint.from_checkpoint(model_dir))
    assert loaded.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys, adapter.keys))
    half = import_peft_adapter(source, model_dir, dtype="bfloat16")
    assert half.config.dtype == "bfloat16" and half.keys[0].dtype == torch.bfloat16


# ----------------------------------------------------------------- refusals

def variant(source, directory, config_patch=None, weights=None, drop=None, add_bin=False):
    """A copy of a saved PEFT adapter with its config / weights / files changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    if config_patch is not None:
        data = peft_config_json(directory)
        config_patch(data)
        (directory / "adapter_config.json").write_text(json.dumps(data))
    if weights is not None:
        path = directory / "adapter_model.safetensors"
        save_file(weights(load_file(str(path))), str(path))
    if drop:
        (directory / drop).unlink()
    if add_bin:
        # Not even a pickle: anything that tried to unpickle it would fail.
        (directory / "adapter_model.bin").write_bytes(b"never opened: refused unread")
    return directory


def with_nan(state):
    bad = {k: v.clone() for k, v in state.items()}
    bad["prompt_embeddings"][0, 0] = float("nan")
    return bad


@pytest.fixture(scope="module")
def weight_adapters(bases, tmp_path_factory):
    """A LoRA and an IA3 adapter saved by PEFT for tiny Llama."""
    from peft import IA3Config, LoraConfig, get_peft_model

    model_dir = bases["llama"][0]
    root = tmp_path_factory.mktemp("weights")
    for name, config in (("lora", LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])),
                         ("ia3", IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                           feedforward_modules=["down_proj"]))):
        get_peft_model(load_tiny("llama", model_dir)[0], config).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name,peft_type", [("lora", "LORA"), ("ia3", "IA3")])
def test_weight_adapters_are_refused(bases, weight_adapters, name, peft_type):
    with pytest.raises(ImportRefusedError,
                       match=f"peft_type '{peft_type}' is not a KV-prefix method; expected one "
                             f"of .*PREFIX_TUNING.*--enable-lora"):
        import_peft_adapter(weight_adapters / name, bases["llama"][0])


@pytest.mark.parametrize("case,patch,message", [
    ("adaption", lambda d: d.update(peft_type="ADAPTION_PROMPT"),
     "peft_type 'ADAPTION_PROMPT' is not a KV-prefix method.*not a plain prefix"),
    ("seq2seq", lambda d: d.update(task_type="SEQ_2_SEQ_LM"),
     "task_type 'SEQ_2_SEQ_LM'; expected CAUSAL_LM"),
    ("encdec", lambda d: d.update(num_transformer_submodules=2),
     "num_transformer_submodules=2 .*expected 1"),
    ("mts", lambda d: d.update(modules_to_save=["lm_head"]),
     r"modules_to_save=\['lm_head'\] also trains base-model modules.*Retrain without"),
    ("layers", lambda d: d.update(num_layers=2),
     "num_layers=2; expected the base model's 3 layers.*another model"),
    ("heads", lambda d: d.update(token_dim=256, num_attention_heads=4),
     r"\(token_dim, num_attention_heads\)=\(256, 4\); the base model's K/V cache needs "
     r"\(128, 2\)"),
])
def test_bad_configs_are_refused(bases, adapters, tmp_path, case, patch, message):
    directory = variant(adapters["llama", "prefix"], tmp_path / case, config_patch=patch)
    with pytest.raises(ImportRefusedError, match=message):
        import_peft_adapter(directory, bases["llama"][0])


def test_adapter_of_another_family_is_refused_by_geometry(bases, adapters, tmp_path):
    # GPT-2's prefix (2 layers of 2x64) would even load into PEFT on the 3-layer Llama
    # (2 KV heads x 64 per layer too); the layer count gives it away.
    with pytest.raises(ImportRefusedError, match="num_layers=2; expected the base model's 3"):
        import_peft_adapter(adapters["gpt2", "prefix"], bases["llama"][0],
                            allow_base_mismatch=True)
    # A soft prompt of Llama's width (256) on GPT-2 (128), layer count made to agree.
    wide = variant(adapters["llama", "prompt"], tmp_path / "wide",
                   config_patch=lambda d: d.update(num_layers=2))
    with pytest.raises(ImportRefusedError, match="token_dim=256; expected the base model's "
                                                 "embedding size 128"):
        import_peft_adapter(wide, bases["gpt2"][0], allow_base_mismatch=True)


def test_adapter_for_another_base_model_is_refused(bases, adapters, tmp_path):
    # Same architecture and geometry, other weights: only the base model says so.
    other = make_tiny_model("llama", tmp_path / "other-llama", seed=1)
    with pytest.raises(ImportRefusedError,
                       match=r"trained on '.*llama', whose fingerprint differs from the base model "
                             r"'.*other-llama' \(embedding_sha256.*`allow_base_mismatch`"):
        import_peft_adapter(adapters["llama", "prefix"], other)
    # A hub name that does not name --model.
    renamed = variant(adapters["llama", "prefix"], tmp_path / "renamed",
                      config_patch=lambda d: d.update(base_model_name_or_path="org/other-model"))
    with pytest.raises(ImportRefusedError, match="base_model_name_or_path='org/other-model'; "
                                                 "found the base model .*another model name"):
        import_peft_adapter(renamed, bases["llama"][0])
    # The user vouches for it: imported, bound to --model's fingerprint.
    adapter = import_peft_adapter(adapters["llama", "prefix"], other, allow_base_mismatch=True)
    assert adapter.config.fingerprint == ModelFingerprint.from_checkpoint(other)


def test_nan_and_wrong_tensors_are_refused(bases, adapters, tmp_path):
    source, model_dir = adapters["llama", "prompt"], bases["llama"][0]
    with pytest.raises(ImportRefusedError, match="tensor 'prompt_embeddings' has NaN/Inf"):
        import_peft_adapter(variant(source, tmp_path / "nan", weights=with_nan), model_dir)
    extra = variant(source, tmp_path / "extra", weights=lambda s: {
        **s, "base_model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(ImportRefusedError, match=r"expected exactly \['prompt_embeddings'\]"):
        import_peft_adapter(extra, model_dir)
    short = variant(source, tmp_path / "short", weights=lambda s: {
        "prompt_embeddings": s["prompt_embeddings"][:-1].contiguous()})
    with pytest.raises(ImportRefusedError, match=r"prompt_embeddings has shape \(4, 256\); "
                                                 r"adapter_config.json says \[5, 256\]"):
        import_peft_adapter(short, model_dir)


def test_pickle_only_checkpoint_is_refused_unopened(bases, adapters, tmp_path):
    source, model_dir = adapters["llama", "prefix"], bases["llama"][0]
    pickled = variant(source, tmp_path / "pickle", drop="adapter_model.safetensors",
                      add_bin=True)
    with pytest.raises(ImportRefusedError,
                       match="found only adapter_model.bin, a pickle; expected "
                             "adapter_model.safetensors. Pickles are never loaded.*"
                             r"save_pretrained\(OUT_DIR\)"):
        import_peft_adapter(pickled, model_dir)
    # Both present: the safetensors is read, the .bin never opened (it is not a pickle).
    both = variant(source, tmp_path / "both", add_bin=True)
    assert import_peft_adapter(both, model_dir).prefix_len == P + 1
    missing = variant(source, tmp_path / "none", drop="adapter_model.safetensors")
    with pytest.raises(ImportRefusedError, match="found neither it nor adapter_model.bin"):
        import_peft_adapter(missing, model_dir)


def test_missing_config_is_refused_without_asking_the_hub(bases, tmp_path):
    with pytest.raises(ImportRefusedError, match="holding adapter_config.json; found none.*"
                                                 "hub is never asked"):
        import_peft_adapter(tmp_path, bases["llama"][0])


def test_task_id_rules(bases, adapters):
    model_dir = bases["llama"][0]
    for task_id in (None, 3, -1):
        with pytest.raises(ImportRefusedError, match=r"`task_id` must be in 0\.\.2, found"):
            import_peft_adapter(adapters["llama", "multitask"], model_dir, task_id=task_id)
    with pytest.raises(ImportRefusedError, match="`task_id` is for MULTITASK_PROMPT_TUNING "
                                                 "adapters; this one is PREFIX_TUNING"):
        import_peft_adapter(adapters["llama", "prefix"], model_dir, task_id=0)


def test_only_the_importer_imports_peft_and_only_when_called():
    """`peft` is an optional extra: no module of the package imports it at module level,
    and only producers/peft.py imports it at all."""
    import ast

    package = REPO_ROOT / "vllm_deepthink"
    anywhere, module_level = set(), set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for nodes, found in ((ast.walk(tree), anywhere), (tree.body, module_level)):
            for node in nodes:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] == "peft" and getattr(node, "level", 0) == 0
                       for n in names):
                    found.add(str(path.relative_to(package)))
    assert anywhere == {"producers/peft.py"} and module_level == set()


@pytest.mark.subprocess
def test_builder_cli_and_frontend_import_without_peft(tmp_path):
    """With `peft` unimportable, the builder, the importers, the CLI and the plugin's
    frontend import, and the PEFT importer refuses with how to install it."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any `import peft` now raises ImportError
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import vllm_deepthink.producers.deepthink.builder
        import vllm_deepthink.producers.past_kv
        import vllm_deepthink.plugin.registry, vllm_deepthink.plugin.rewrite
        import vllm_deepthink.apps.cli, vllm_deepthink.apps.importers
        from vllm_deepthink.producers import peft as importer
        from vllm_deepthink.producers.kv_import import ImportRefusedError
        try:
            importer._import_peft()
            raise SystemExit("peft imported")
        except ImportRefusedError as exc:
            assert "pip install 'vllm-deepthink[peft]'" in str(exc), exc
        assert not [m for m in sys.modules if m.split(".")[0] == "peft" and sys.modules[m]]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


def test_missing_peft_is_a_clear_error(monkeypatch):
    from vllm_deepthink.producers import peft as importer

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportRefusedError, match=r"needs the `peft` package.*"
                                                 r"pip install 'vllm-deepthink\[peft\]'"):
        importer._import_peft()
