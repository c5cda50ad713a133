"""Deep-Thinking builder: parity with a naive re-implementation, position modes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from tests.helpers import REPO_ROOT
from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.format import hf_cache
from vllm_deepthink.producers.deepthink import builder, rotary
from vllm_deepthink.producers.deepthink.errors import BuildError
from vllm_deepthink.producers.deepthink.iteration import deep_thinking_steps
from vllm_deepthink.format import DeepThinkAdapter

REPO = REPO_ROOT
DEMOS = ("Review: a charming film\nSentiment: positive\n\n"
         "Review: contains no wit , only labored gags\nSentiment: negative\n\n")
QUERY = "Review: the quick brown fox\nSentiment:"
ITERATIONS = 5


def _random_model(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def tiny_gemma3(sliding_window=64):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=sliding_window,
        max_position_embeddings=512, layer_types=["sliding_attention", "sliding_attention",
                                                  "full_attention"],
        # local and global layers: different bases, and linear scaling on the global one
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0}})
    return _random_model(config)


def tiny_llama_yarn():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 256})
    return _random_model(config)


def tiny_other(kind):
    from transformers import MistralConfig, OPTConfig, Qwen2Config

    if kind == "qwen2":
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512)
    elif kind == "mistral":
        config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=16, max_position_embeddings=512, sliding_window=128)
    else:
        config = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=256,
                           word_embed_proj_dim=64)
    return _random_model(config)


def demo_ids(tokenizer):
    return builder.tokenize_demos(tokenizer, DEMOS)


# ----------------------------------------------------------------- naive reference

def naive_rotate_back(key, shift, theta):
    """R(-shift) with default RoPE (no scaling), written out from the RoPE formula."""
    dim = key.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = shift * inv_freq
    out = torch.empty_like(key)
    half = dim // 2
    for i in range(half):
        c, s = float(torch.cos(angle[i])), float(torch.sin(angle[i]))
        x, y = key[..., i], key[..., i + half]
        out[..., i] = x * c + y * s
        out[..., i + half] = -x * s + y * c
    return out


def naive_deep_thinking(model, ids, iterations, optimizer, aligned=False,
                        step_size=0.01, beta=0.9, eta=0.01):
    """Per iteration (keys, values), each a list over layers of [kv_heads, L, head_dim]."""
    L = len(ids)
    x = torch.tensor([ids])
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(input_ids=x, position_ids=torch.arange(L)[None], use_cache=True)
        keys = [out.past_key_values.layers[i].keys[0, :, 0:L].clone() for i in range(n_layers)]
        values = [out.past_key_values.layers[i].values[0, :, 0:L].clone() for i in range(n_layers)]
        history = [(keys, values)]
        momentum_k = [None] * n_layers
        momentum_v = [None] * n_layers
        for _ in range(2, iterations + 1):
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(keys[i][None].clone(), values[i][None].clone(), i)
            model(input_ids=x, past_key_values=cache, position_ids=torch.arange(L, 2 * L)[None],
                  attention_mask=torch.ones(1, 2 * L, dtype=torch.long), use_cache=True)
            new_keys, new_values = [], []
            for i in range(n_layers):
                k_new = cache.layers[i].keys[0, :, L:2 * L]
                if aligned:
                    k_new = naive_rotate_back(k_new, L, model.config.rope_parameters["rope_theta"])
                new_keys.append(k_new)
                new_values.append(cache.layers[i].values[0, :, L:2 * L])
            next_keys, next_values = [], []
            for i in range(n_layers):
                if optimizer == "momentum":
                    gk, gv = new_keys[i] - keys[i], new_values[i] - values[i]
                    momentum_k[i] = gk if momentum_k[i] is None else gk + beta * momentum_k[i]
                    momentum_v[i] = gv if momentum_v[i] is None else gv + beta * momentum_v[i]
                    next_keys.append(keys[i] + step_size * momentum_k[i])
                    next_values.append(values[i] + step_size * momentum_v[i])
                else:
                    next_keys.append(eta * new_keys[i] + (1 - eta) * keys[i])
                    next_values.append(eta * new_values[i] + (1 - eta) * values[i])
            keys, values = next_keys, next_values
            history.append((keys, values))
    return history


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------- parity

@pytest.mark.parametrize("kind,optimizer,mode", [
    ("llama", "momentum", "published"), ("llama", "ema", "published"),
    ("llama", "momentum", "aligned"), ("llama", "ema", "aligned"),
    ("gpt2", "momentum", "published"), ("gpt2", "ema", "published"),
])
def test_parity_with_naive(kind, optimizer, mode, tiny_llama_loaded, tiny_gpt2_loaded):
    model, tokenizer = tiny_llama_loaded if kind == "llama" else tiny_gpt2_loaded
    ids = demo_ids(tokenizer)
    # eta 0.3 so that a wrong EMA update would show well above float noise
    kwargs = {"eta": 0.3} if optimizer == "ema" else {}
    expected = naive_deep_thinking(model, ids, ITERATIONS, optimizer, aligned=mode == "aligned",
                                   **kwargs)
    got = list(deep_thinking_steps(model, ids, iterations=ITERATIONS, optimizer=optimizer,
                                   position_mode=mode, **kwargs))
    assert [it for it, _, _ in got] == list(range(1, ITERATIONS + 1))
    for (it, keys, values), (ref_keys, ref_values) in zip(got, expected):
        assert keys[0].shape == ref_keys[0].shape == (model.config.num_key_value_heads
                                                      if kind == "llama" else 2, len(ids), 64)
        assert max_diff(keys, ref_keys) < 1e-5, f"iteration {it} keys"
        assert max_diff(values, ref_values) < 1e-5, f"iteration {it} values"
    # the iteration really moves the K/V (otherwise parity would be vacuous)
    assert max_diff(got[-1][1], got[0][1]) > 1e-3


def test_step_one_is_plain_forward(tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    ids = demo_ids(tokenizer)
    cache = model(input_ids=torch.tensor([ids])).past_key_values
    (_, keys, values), = deep_thinking_steps(model, ids, iterations=1)
    for i, layer in enumerate(cache.layers):
        assert torch.equal(keys[i], layer.keys[0])
        assert torch.equal(values[i], layer.values[0])


def test_demos_start_with_bos(tiny_llama_loaded):
    _, tokenizer = tiny_llama_loaded
    assert demo_ids(tokenizer)[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("kind,mode", [
    ("gemma3", "published"), ("gemma3", "aligned"), ("qwen2", "published"),
    ("qwen2", "aligned"), ("mistral", "published"), ("opt", "published"),
])
def test_step_two_equals_demos_twice_in_one_prompt(kind, mode):
    """At step 2 the prefix is the plain forward, so the demos' new K/V equal the last L
    positions of one forward pass over [demos, demos]; sliding layers included."""
    model = tiny_gemma3() if kind == "gemma3" else tiny_other(kind)
    torch.manual_seed(1)
    ids = torch.randint(4, 500, (20,)).tolist()
    L = len(ids)
    with torch.no_grad():
        once = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
        twice = model(input_ids=torch.tensor([ids + ids]), use_cache=True).past_key_values
    eta = 0.5
    steps = list(deep_thinking_steps(model, ids, iterations=2, optimizer="ema", eta=eta,
                                     position_mode=mode))
    for i in range(len(once.layers)):
        for name in ("keys", "values"):
            first = getattr(once.layers[i], name)[0]
            new = getattr(twice.layers[i], name)[0, :, -L:]
            if mode == "aligned" and name == "keys":
                new = rotary.rotate_keys_back(model, [l.keys[0, :, -L:] for l in twice.layers],
                                              L)[i]
            expected = eta * new + (1 - eta) * first
            got = (steps[1][1] if name == "keys" else steps[1][2])[i]
            assert (got - expected).abs().max().item() < 1e-5, (kind, i, name)


# ----------------------------------------------------------------- aligned rotation

def _keys_at(model, ids, start):
    L = len(ids)
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + L)[None],
                      use_cache=True).past_key_values
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("kind", ["llama", "llama_yarn", "gemma3"])
def test_rotate_back_inverts_the_shift(kind, tiny_llama_loaded):
    if kind == "llama":
        model, tokenizer = tiny_llama_loaded
        ids = demo_ids(tokenizer)
    else:
        model = tiny_llama_yarn() if kind == "llama_yarn" else tiny_gemma3()
        ids = torch.randint(4, 500, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    L = len(ids)
    at_p = _keys_at(model, ids, 0)
    at_p_plus_l = _keys_at(model, ids, L)
    back = rotary.rotate_keys_back(model, at_p_plus_l, L)
    assert max_diff(at_p_plus_l, at_p) > 0.1  # the shift really changes the keys
    assert max_diff(back, at_p) < 1e-4


def test_yarn_attention_factor_is_divided_out():
    model = tiny_llama_yarn()
    assert abs(model.model.rotary_emb.attention_scaling - 1.0) > 0.05
    cos, sin = rotary.layer_rotations(model, 7, 14)[0]
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-6)


def test_gemma3_layers_use_their_own_rope():
    model = tiny_gemma3()
    rotations = rotary.layer_rotations(model, 9, 18)
    assert torch.equal(rotations[0][0], rotations[1][0])  # both sliding layers
    assert not torch.allclose(rotations[0][0], rotations[2][0])  # local vs global base


# ----------------------------------------------------------------- inference semantics

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_prefix_equals_icl_prompt(kind, tiny_llama_loaded, tiny_gpt2_loaded):
    model, tokenizer = tiny_llama_loaded if kind == "llama" else tiny_gpt2_loaded
    adapter = builder.build_adapter(model, tokenizer, DEMOS, iterations=1, progress=False)
    L = adapter.prefix_len
    query = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        cache = hf_cache.cache_from_kv(adapter.as_past_key_values(), model.config)
        with_prefix = model(input_ids=torch.tensor([query]), past_key_values=cache,
                            attention_mask=torch.ones(1, L + len(query), dtype=torch.long)).logits
        full = model(input_ids=torch.tensor([adapter.config.demo_token_ids + query])).logits
    assert torch.allclose(with_prefix.log_softmax(-1), full[:, L:].log_softmax(-1), atol=1e-5)


def test_cache_from_kv_expands_batch(tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    adapter = builder.build_adapter(model, tokenizer, DEMOS, iterations=2, progress=False)
    query = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    L = adapter.prefix_len
    with torch.no_grad():
        one = model(input_ids=torch.tensor([query]),
                    past_key_values=hf_cache.cache_from_kv(adapter.as_past_key_values(),
                                                           model.config)).logits
        three = model(input_ids=torch.tensor([query] * 3),
                      past_key_values=hf_cache.cache_from_kv(adapter.as_past_key_values(),
                                                             model.config, batch_size=3),
                      attention_mask=torch.ones(3, L + len(query), dtype=torch.long)).logits
    assert torch.allclose(three, one.expand(3, -1, -1), atol=1e-5)


# ----------------------------------------------------------------- build_adapter

def test_build_adapter_fills_config(tiny_llama_loaded):
    model, tokenizer = tiny_llama_loaded
    adapter = builder.build_adapter(model, tokenizer, DEMOS, iterations=3, optimizer="ema",
                                    eta=0.2, position_mode="aligned", progress=False,
                                    task={"name": "toy"}, build_args={"x": 1})
    cfg = adapter.config
    steps = list(deep_thinking_steps(model, demo_ids(tokenizer), iterations=3,
                                     optimizer="ema", eta=0.2, position_mode="aligned"))
    assert max_diff(adapter.keys, steps[-1][1]) == 0 and max_diff(adapter.values, steps[-1][2]) == 0
    assert cfg.demo_token_ids == demo_ids(tokenizer) and cfg.prefix_len == len(cfg.demo_token_ids)
    assert cfg.optimizer_params == {"eta": 0.2} and cfg.position_mode == "aligned"
    assert (cfg.iterations_run, cfg.selected_iteration) == (3, 3)
    assert cfg.selection_trace == [{"iteration": i, "dev_acc": None, "dev_acc_norm": None}
                                   for i in (1, 2, 3)]
    assert cfg.task == {"name": "toy"} and cfg.build_args == {"x": 1}
    assert cfg.builder_version == builder.builder_version() != ""
    assert cfg.dtype == "float32" and cfg.fingerprint.model_type == "llama"


def test_dev_scoring_uses_the_current_kv(tiny_llama_loaded):
    scoring = pytest.importorskip("vllm_deepthink.tasks.scoring")
    model, tokenizer = tiny_llama_loaded
    items = [scoring.ChoiceItem(query=QUERY, choices=[" positive", " negative"], label=0),
             scoring.ChoiceItem(query="Review: only labored gags\nSentiment:",
                                choices=[" positive", " negative"], label=1)]
    adapter = builder.build_adapter(model, tokenizer, DEMOS, iterations=3, dev_items=items,
                                    progress=False)
    for entry in adapter.config.selection_trace:
        steps = list(deep_thinking_steps(model, demo_ids(tokenizer),
                                         iterations=entry["iteration"]))
        past = [(k[None], v[None]) for k, v in zip(steps[-1][1], steps[-1][2])]
        scores = scoring.score_items_hf(model, tokenizer, items, past_key_values=past)
        acc = scoring.accuracy(scores, [i.label for i in items])
        assert (entry["dev_acc"], entry["dev_acc_norm"]) == (acc["acc"], acc["acc_norm"])


# ----------------------------------------------------------------- errors

def test_aligned_rejects_learned_positions(tiny_gpt2_loaded):
    model, tokenizer = tiny_gpt2_loaded
    with pytest.raises(BuildError, match="learned absolute positions.*published"):
        next(deep_thinking_steps(model, demo_ids(tokenizer), iterations=2,
                                 position_mode="aligned"))


def test_demos_too_long_for_positions(tiny_gpt2_loaded):
    model, _ = tiny_gpt2_loaded  # n_positions 1024
    with pytest.raises(BuildError, match=r"2\*L = 1026 must be <= the model's 1024"):
        next(deep_thinking_steps(model, [5] * 513, iterations=2))


def test_demos_too_long_for_sliding_window():
    model = tiny_gemma3(sliding_window=32)
    with pytest.raises(BuildError, match=r"sliding window of 32 tokens.*at most 16"):
        next(deep_thinking_steps(model, [5] * 17, iterations=2))
    assert len(list(deep_thinking_steps(model, [5] * 16, iterations=2))) == 2


def test_unsupported_architecture():
    from transformers import GPTNeoXConfig

    model = _random_model(GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(BuildError, match="model_type 'gpt_neox'.*not supported"):
        next(deep_thinking_steps(model, [5, 6, 7], iterations=2))


# ----------------------------------------------------------------- CLI, no vLLM

@pytest.mark.subprocess
def test_cli_build_never_imports_vllm(tiny_llama_dir, tmp_path):
    model_dir = tiny_llama_dir
    demos = tmp_path / "toy.txt"
    demos_text = DEMOS.replace("\n\n", "\r\n\n", 1)  # read back exactly, \r included
    demos.write_bytes(demos_text.encode("utf-8"))
    out = tmp_path / "adapter"
    script = (
        "import sys, json\n"
        "from vllm_deepthink.apps import cli\n"
        f"rc = cli.main(['build', '--model', {str(model_dir)!r}, '--demos-text', {str(demos)!r},"
        f" '--iterations', '3', '--optimizer', 'ema', '--eta', '0.05',"
        f" '--position-mode', 'aligned', '--out', {str(out)!r},"
        f" '--output-json', {str(tmp_path / 'summary.json')!r}])\n"
        "assert rc == 0\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    model, tokenizer = load_tiny("llama", model_dir)
    adapter = DeepThinkAdapter.from_pretrained(out, expected_fingerprint=None)
    cfg = adapter.config
    assert (cfg.optimizer, cfg.optimizer_params, cfg.position_mode) == ("ema", {"eta": 0.05},
                                                                        "aligned")
    assert cfg.build_args["iterations"] == 3 and cfg.demos_text == demos_text
    steps = list(deep_thinking_steps(model, cfg.demo_token_ids, iterations=3,
                                     optimizer="ema", eta=0.05, position_mode="aligned"))
    assert max_diff(adapter.keys, steps[-1][1]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selected_iteration"] == 3 and summary["out"] == str(out)


def test_cli_rejects_aligned_gpt2_before_loading(tiny_gpt2_dir, tmp_path, capsys):
    from vllm_deepthink.apps import cli

    model_dir = tiny_gpt2_dir
    demos = tmp_path / "toy.txt"
    demos.write_text(DEMOS, encoding="utf-8")
    with pytest.raises(SystemExit, match="learned absolute positions"):
        cli.main(["build", "--model", str(model_dir), "--demos-text", str(demos),
                  "--position-mode", "aligned", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit, match="--eta belongs to --optimizer ema"):
        cli.main(["build", "--model", str(model_dir), "--demos-text", str(demos),
                  "--eta", "0.1", "--out", str(tmp_path / "a")])


def test_default_out_name():
    from argparse import Namespace

    from vllm_deepthink.apps.build import default_out

    args = Namespace(task_dir="examples/data/sst2", dataset=None, demos_text=None,
                     model="models/SmolLM2-135M")
    assert default_out(args) == Path("adapters_store/sst2-smollm2-135m")
    args = Namespace(task_dir=None, dataset=None, demos_text="my_demos.txt",
                     model="models/smollm2-135m/")
    assert default_out(args) == Path("adapters_store/my_demos-smollm2-135m")
    args = Namespace(task_dir=None, dataset="glue:sst2", demos_text=None, model="Org/Tiny-LM")
    assert default_out(args) == Path("adapters_store/glue-sst2-tiny-lm")
    args = Namespace(task_dir=None, dataset=None, demos_text="d.txt", model=".")
    assert default_out(args) == Path(f"adapters_store/d-{Path.cwd().name}".lower())


def test_cli_build_from_task_dir_selects_on_dev(tiny_llama_dir, tmp_path, capsys):
    from vllm_deepthink.apps import cli

    sst2 = REPO / "examples" / "data" / "sst2"  # shipped with the repository
    model_dir = tiny_llama_dir
    out = tmp_path / "adapter"
    assert cli.main(["build", "--model", str(model_dir), "--task-dir", str(sst2),
                     "--shots-per-class", "1", "--seed", "3", "--iterations", "3",
                     "--dev-size", "8", "--guard-k", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "iteration   1  dev acc" in err and "iteration   3  dev acc" in err
    assert "guard 0 SE" in err
    cfg = DeepThinkAdapter.from_pretrained(out).config
    assert cfg.task["shots_per_class"] == 1 and cfg.task["seed"] == 3
    assert cfg.position_mode == "published"  # the default, also for a RoPE model
    assert len(cfg.task["demo_indices"]) == 2 and cfg.task["dev_size"] == 8
    accs = [e["dev_acc"] for e in cfg.selection_trace]
    assert len(accs) == 3 and all(a is not None for a in accs)
    for entry in cfg.selection_trace:  # per-label prediction counts of the 8 dev items
        assert len(entry["dev_counts"]) == 2 and sum(entry["dev_counts"]) == 8
    # guard 0: any strict gain over T=1 moves off it
    assert cfg.selected_iteration == 1 + accs.index(max(accs))
    assert cfg.build_args["select_on"] == "dev"
    assert cfg.selection["select_on"] == "dev" and cfg.selection["guard"]["k"] == 0


def test_cli_build_selects_on_a_held_out_split(tiny_llama_dir, tmp_path, capsys):
    """--dev-split validation: the dev rows come from validation.jsonl, the record says
    so (eval --calibrate dev-prior rebuilds the same rows), and the evaluation split is
    refused before any model is loaded."""
    import shutil

    from vllm_deepthink.apps import cli
    from vllm_deepthink.tasks import dev_split_of, load_task

    task_dir = tmp_path / "sst2"
    shutil.copytree(REPO / "examples" / "data" / "sst2", task_dir)
    validation = [{"text": f"a held-out sentence number {i}", "label": i % 2} for i in range(10)]
    (task_dir / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    model_dir = tiny_llama_dir
    out = tmp_path / "adapter"
    assert cli.main(["build", "--model", str(model_dir), "--task-dir", str(task_dir),
                     "--shots-per-class", "1", "--iterations", "2", "--dev-size", "6",
                     "--dev-split", "validation", "--guard-k", "0", "--out", str(out)]) == 0
    record = DeepThinkAdapter.from_pretrained(out).config.task
    assert record["dev_split"] == "validation" and record["dev_size"] == 6
    rows = dev_split_of(load_task(task_dir), record)
    assert len(rows) == 6 and all(row in validation for row in rows)
    # the rows the builder scores are the ones the record rebuilds
    from transformers import AutoConfig, AutoTokenizer

    from vllm_deepthink.producers.deepthink.from_task import task_build_inputs
    inputs = task_build_inputs(load_task(task_dir), AutoTokenizer.from_pretrained(model_dir),
                               AutoConfig.from_pretrained(model_dir), shots_per_class=1,
                               seed=0, dev_size=6, dev_split="validation")
    assert inputs.dev_rows == rows and inputs.info["dev_split"] == "validation"
    capsys.readouterr()
    with pytest.raises(SystemExit, match="'test' is the split being evaluated"):
        cli.main(["build", "--model", str(model_dir), "--task-dir", str(task_dir),
                  "--dev-split", "test", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--dev-split validation applies to --select-on dev"):
        cli.main(["build", "--model", str(model_dir), "--task-dir", str(task_dir),
                  "--dev-split", "validation", "--select-on", "none", "--out", str(tmp_path / "c")])
