"""compress_adapter on a tiny Llama: distillation lowers the KL, the teachers, the record
(round trip and validation), label_calibration recomputed, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.format.test_methods import imported, resave_with_header
from tests.helpers.adapter_factory import noisy_adapter
from tests.helpers.tiny_models import CORPUS, load_tiny, make_tiny_model
from vllm_deepthink.format import AdapterFormatError, DeepThinkAdapter
from vllm_deepthink.producers.compress import CompressError, DistillSettings, compress_adapter
from vllm_deepthink.producers.compress import teachers
from vllm_deepthink.producers.compress.distill import answer_logp
from vllm_deepthink.producers.compress.compress import answer_ids, resolve_prefix_len

QUERIES = [f"{line.split(chr(10))[0]} {i}" for i in range(6) for line in CORPUS]  # 36
LABEL_IDS = [40, 41]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_tiny("llama", tiny_llama_dir)


@pytest.fixture(scope="module")
def source(llama, tmp_path_factory):
    """A Deep-Thinking-format adapter of 48 positions with a label calibration over two
    single tokens (as a classification build records it)."""
    model, tokenizer = llama
    adapter = noisy_adapter(model, tokenizer, tmp_path_factory.mktemp("src") / "a", 48)
    adapter.config.label_calibration = {
        "label_words": ["a", "b"], "label_token_ids": LABEL_IDS,
        "content-free": {"log_prior": [-0.2, -1.7], "inputs": ["N/A", "[MASK]"]},
        "dev-prior": {"log_prior": [-0.4, -1.1], "n": 8}}
    directory = tmp_path_factory.mktemp("src-cal")
    adapter.save_pretrained(directory)
    return DeepThinkAdapter.from_pretrained(directory)


@pytest.fixture(scope="module")
def distilled(llama, source):
    model, tokenizer = llama
    settings = DistillSettings(steps=6, eval_every=2, patience=0, batch_size=8, lr=3e-3)
    steps = []
    adapter = compress_adapter(source, model, tokenizer, QUERIES, prefix_len=12,
                               distill=settings, dev_size=8, progress=False,
                               on_step=steps.append)
    return adapter, steps


def test_selection_only_is_an_ordinary_adapter_with_its_record(llama, source, tmp_path):
    model, tokenizer = llama
    adapter = compress_adapter(source, model, tokenizer, QUERIES, ratio=4, dev_size=8,
                               progress=False)
    c = adapter.config
    assert c.method == "compressed" and c.prefix_len == 12 == c.num_virtual_tokens
    assert c.placeholder_token_ids() == [0] * 12
    r = c.compression
    assert r["source_method"] == "deepthink" and r["source_prefix_len"] == 48
    assert r["source_digest"] == source.digest
    assert r["queries"]["count"] == 36 and r["queries"]["dev"] == 8
    assert r["distill"] is None and r["dev"]["selection"]["n"] == 8
    kept = torch.tensor(r["selection"]["positions"])
    assert kept.shape == (3, 2, 12) and (kept[..., 0] == 0).all()
    # The stored K/V are the source's at the kept positions (values are not rotated).
    assert torch.equal(adapter.values[1][0], source.values[1][0][kept[1, 0]])
    assert adapter.config.label_calibration["dev-prior"]["n"] == 8
    adapter.save_pretrained(tmp_path / "c")
    loaded = DeepThinkAdapter.from_pretrained(tmp_path / "c")
    assert loaded.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys, adapter.keys))


def test_distillation_lowers_the_kl_and_records_every_step(llama, distilled):
    model, _ = llama
    adapter, steps = distilled
    record = adapter.config.compression
    trace = record["distill"]["trace"]
    assert [e["step"] for e in trace] == list(range(7)) and steps == trace[1:]
    evaluated = [e for e in trace if "dev_kl" in e]
    assert [e["step"] for e in evaluated] == [0, 2, 4, 6]
    assert evaluated[-1]["dev_kl"] < evaluated[0]["dev_kl"]
    assert record["dev"]["final"]["kl"] < record["dev"]["selection"]["kl"]
    assert record["distill"]["settings"]["steps"] == 6
    # "auto" became the answer-token objective: the labels are one token each.
    assert record["distill"]["settings"]["positions"] == "answer"
    # The model stays frozen and untouched.
    assert all(p.requires_grad for p in model.parameters())
    assert record["dev"]["answer_token_ids"] == LABEL_IDS


def test_distillation_starts_from_the_selection_and_moves_the_kv(llama, source, distilled):
    model, tokenizer = llama
    adapter, _ = distilled
    selected = compress_adapter(source, model, tokenizer, QUERIES, prefix_len=12, dev_size=8,
                                progress=False)
    assert (selected.config.compression["selection"]["positions"]
            == adapter.config.compression["selection"]["positions"])
    assert (selected.config.compression["dev"]["selection"]
            == adapter.config.compression["dev"]["selection"])
    assert not torch.equal(selected.keys[0], adapter.keys[0])
    assert not torch.equal(selected.values[2], adapter.values[2])


def test_label_calibration_is_recomputed_for_the_compressed_prefix(llama, source, distilled):
    adapter, _ = distilled
    new, old = adapter.config.label_calibration, source.config.label_calibration
    assert new["label_token_ids"] == LABEL_IDS and new["content-free"]["inputs"] == ["N/A",
                                                                                     "[MASK]"]
    assert new["content-free"]["log_prior"] != old["content-free"]["log_prior"]
    assert adapter.config.compression["label_calibration"].startswith("recomputed")


def test_calibrated_teacher_divides_the_prior_out_at_the_answer_position(llama, source):
    model, tokenizer = llama
    prefix = list(zip(source.keys, source.values))
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:3]]
    plain = teachers.teacher_targets(model, teachers.source_teacher(prefix), ids,
                                     answer_ids=LABEL_IDS, progress=False)
    cal = teachers.teacher_targets(
        model, teachers.calibrated_teacher(prefix, source.config.label_calibration), ids,
        answer_ids=LABEL_IDS, progress=False)

    def label_logps(t):
        row = dict(zip(t.ids[-1].tolist(), t.logp[-1].tolist()))
        return [row[i] for i in LABEL_IDS]

    for p, c in zip(plain, cal):
        a, b = label_logps(p), label_logps(c)
        # log p(a)/p(b) moves by -(prior_a - prior_b) = -(-0.2 + 1.7)
        assert (b[0] - b[1]) - (a[0] - a[1]) == pytest.approx(-1.5, abs=1e-4)
        assert torch.equal(p.ids[:-1], c.ids[:-1])  # other positions untouched


def test_calibrated_draws_divide_each_prefixs_own_query_prior_out(llama, source):
    """Two draws (the source and a second prefix): each one's label prior is the mean of
    its answer distributions over the queries, divided out before the average; every
    other position is the plain average."""
    model, tokenizer = llama
    first = list(zip(source.keys, source.values))
    second = [(k.flip(-2), v.flip(-2)) for k, v in first]  # another prefix of the same shape
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:6]]
    plain = teachers.Teacher("ensemble", [first, second])
    cal, one_pass = teachers.priors_and_targets(model, teachers.calibrated_draws(plain), ids,
                                                answer_ids=LABEL_IDS, progress=False)
    assert cal.name == "ensemble-calibrated" and len(cal.info["log_priors"]) == 2

    for p, prefix in enumerate((first, second)):
        targets = teachers.teacher_targets(model, teachers.source_teacher(prefix), ids,
                                           answer_ids=LABEL_IDS, progress=False)
        probs = torch.stack([answer_logp(t, LABEL_IDS).exp() for t in targets])
        assert cal.info["log_priors"][p] == pytest.approx(probs.mean(0).log().tolist(), abs=1e-5)
    got = teachers.teacher_targets(model, cal, ids, answer_ids=LABEL_IDS, progress=False)
    mixed = teachers.teacher_targets(model, plain, ids, answer_ids=LABEL_IDS, progress=False)
    for q, (g, m) in enumerate(zip(got, mixed)):
        expected = 0
        for p, prefix in enumerate((first, second)):
            (t,) = teachers.teacher_targets(model, teachers.source_teacher(prefix), [ids[q]],
                                            answer_ids=LABEL_IDS, progress=False)
            # p(answer) * exp(bias) renormalized over the whole vocabulary at that row
            logp_row = dict(zip(t.ids[-1].tolist(), t.logp[-1].tolist()))
            raw = torch.tensor([logp_row[i] for i in LABEL_IDS])
            shifted = raw - torch.tensor(cal.info["log_priors"][p])
            mass_rest = 1 - raw.exp().sum()
            expected = expected + shifted.exp() / (shifted.exp().sum() + mass_rest) / 2
        row = dict(zip(g.ids[-1].tolist(), g.logp[-1].tolist()))
        assert [row[i] for i in LABEL_IDS] == pytest.approx(expected.log().tolist(), abs=1e-4)
        assert torch.equal(g.ids[:-1], m.ids[:-1])  # other positions: the plain average
        assert torch.allclose(g.logp[:-1], m.logp[:-1])
    for g, o in zip(got, one_pass):  # the priors' run gave the same targets
        assert torch.equal(g.ids, o.ids)
        assert torch.allclose(g.logp, o.logp, atol=1e-6)
        assert torch.allclose(g.log_rest, o.log_rest, atol=1e-6)
    with pytest.raises(teachers.TeacherError, match="priors first"):
        teachers.teacher_targets(model, teachers.calibrated_draws(plain), ids[:1],
                                 answer_ids=LABEL_IDS, progress=False)
    with pytest.raises(teachers.TeacherError, match="one answer token per label"):
        teachers.priors_and_targets(model, teachers.calibrated_draws(plain), ids,
                                    answer_ids=None, progress=False)


def test_answer_tokens_are_the_labels_tokens_or_their_distinct_first_tokens(llama):
    tokenizer = llama[1]
    first = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in
             (" negative", " positive", " neutral")]
    assert len(first[0]) > 1 and first[0][0] != first[1][0]
    assert answer_ids(tokenizer, None, [" negative", " positive"]) == [first[0][0],
                                                                       first[1][0]]
    assert first[0][0] == first[2][0]  # " n..." twice: they do not decide between labels
    assert answer_ids(tokenizer, None, [" negative", " positive", " neutral"]) is None
    assert answer_ids(tokenizer, {"label_token_ids": [5, 6]}, [" negative", " positive"]) \
        == [5, 6]
    assert answer_ids(tokenizer, None, None) is None


def test_calibrated_teacher_on_labels_of_several_tokens(llama, source):
    """Labels of several tokens that begin differently: the prior is divided out on
    their first tokens; labels that are not the calibration's are refused."""
    model, tokenizer = llama
    calibration = {**source.config.label_calibration, "label_token_ids": None,
                   "label_words": ["negative", "positive"]}
    multi = DeepThinkAdapter(config=dataclasses.replace(source.config,
                                                        label_calibration=calibration),
                             keys=source.keys, values=source.values)
    settings = DistillSettings(steps=1, eval_every=1, patience=0, batch_size=8)
    adapter = compress_adapter(multi, model, tokenizer, QUERIES, prefix_len=12,
                               distill=settings, teacher="calibrated",
                               choices=[" negative", " positive"], dev_size=8,
                               progress=False)
    firsts = answer_ids(tokenizer, None, [" negative", " positive"])
    record = adapter.config.compression
    assert record["distill"]["teacher"]["label_token_ids"] == firsts
    assert record["dev"]["answer_token_ids"] == firsts
    assert record["distill"]["settings"]["positions"] == "answer"
    with pytest.raises(CompressError, match="are not the labels of the source"):
        compress_adapter(multi, model, tokenizer, QUERIES, prefix_len=12, distill=settings,
                         teacher="calibrated", choices=[" positive", " negative"],
                         dev_size=8, progress=False)
    with pytest.raises(CompressError, match="begin with different tokens"):
        compress_adapter(multi, model, tokenizer, QUERIES, prefix_len=12, distill=settings,
                         teacher="calibrated", dev_size=8, progress=False)


def test_record_is_validated(source, distilled, tmp_path):
    adapter, _ = distilled
    directory = tmp_path / "c"
    adapter.save_pretrained(directory)
    for change, message in [
            (lambda d: d.update(compression=None), "needs a compression record"),
            (lambda d: d["compression"].pop("queries"), r"lacks \['queries'\]"),
            (lambda d: d["compression"].update(prefix_len=13), "expected k == prefix_len"),
            (lambda d: d["compression"].update(source_digest="x"), "sha256")]:
        target = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
        adapter.save_pretrained(target)
        resave_with_header(adapter, target, change)
        with pytest.raises(AdapterFormatError, match=message):
            DeepThinkAdapter.from_pretrained(target)
    other = tmp_path / "dt"
    source.save_pretrained(other)
    resave_with_header(source, other, lambda d: d.update(compression=adapter.config.compression))
    with pytest.raises(AdapterFormatError, match="only method 'compressed' carries one"):
        DeepThinkAdapter.from_pretrained(other)


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix_len": 48}, r"`prefix_len` must be an integer in \[2, 47\]"),
    ({"prefix_len": 1}, r"`prefix_len` must be an integer in \[2, 47\]"),
    ({"ratio": 1.0}, "`ratio` must be > 1"),
    ({"ratio": 40.0}, r"found 1"),
    ({}, "exactly one of `prefix_len`"),
    ({"prefix_len": 8, "ratio": 2.0}, "exactly one of `prefix_len`"),
])
def test_bad_k_is_refused(kwargs, message):
    with pytest.raises(CompressError, match=message):
        resolve_prefix_len(48, **kwargs)


def test_refusals(llama, source, tmp_path):
    model, tokenizer = llama
    with pytest.raises(CompressError, match="`prefix_len` must be an integer"):
        compress_adapter(source, model, tokenizer, QUERIES, prefix_len=48, progress=False)
    with pytest.raises(CompressError, match="distillation teacher"):
        compress_adapter(source, model, tokenizer, QUERIES, prefix_len=8, teacher="calibrated",
                         progress=False)
    with pytest.raises(CompressError, match="at least 2"):
        compress_adapter(source, model, tokenizer, QUERIES[:1], prefix_len=8, progress=False)
    past_kv = imported(model, method="past-kv", virtual=20, specials=())
    with pytest.raises(CompressError, match="needs the source's label_calibration"):
        compress_adapter(past_kv, model, tokenizer, QUERIES, prefix_len=8, teacher="calibrated",
                         distill=DistillSettings(steps=1), progress=False)
    with pytest.raises(teachers.TeacherError, match="Deep-Thinking source built from a task"):
        teachers.ensemble_teacher(model, tokenizer, None, past_kv, [0, 1])
    other, _ = load_tiny("llama", make_tiny_model("llama", tmp_path / "other", seed=1))
    with pytest.raises(CompressError, match="different base model"):
        compress_adapter(source, other, tokenizer, QUERIES, prefix_len=8, progress=False)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_every_objective_lowers_its_own_kl(llama, source, positions):
    model, tokenizer = llama
    adapter = compress_adapter(source, model, tokenizer, QUERIES, prefix_len=12, dev_size=8,
                               distill=DistillSettings(steps=4, eval_every=4, patience=0,
                                                       batch_size=8, lr=3e-3,
                                                       positions=positions),
                               progress=False)
    record = adapter.config.compression
    assert record["distill"]["settings"]["positions"] == positions
    assert record["dev"]["final"]["kl"] < record["dev"]["selection"]["kl"]


def test_the_answer_objective_needs_answer_tokens(llama):
    model, tokenizer = llama
    past_kv = imported(model, method="past-kv", virtual=20, specials=())
    with pytest.raises(CompressError, match="'answer' needs the answer tokens"):
        compress_adapter(past_kv, model, tokenizer, QUERIES, prefix_len=5, dev_size=4,
                         distill=DistillSettings(steps=1, positions="answer"), progress=False)
    # "auto" falls back to every position when there are none.
    adapter = compress_adapter(past_kv, model, tokenizer, QUERIES, prefix_len=5, dev_size=4,
                               distill=DistillSettings(steps=1, eval_every=1), progress=False)
    assert adapter.config.compression["distill"]["settings"]["positions"] == "all"


def test_the_lm_head_on_a_few_tokens_equals_those_columns(llama):
    from vllm_deepthink.tasks import scoring

    model, _ = llama
    hidden = torch.randn(3, model.config.hidden_size)
    ids = torch.tensor(LABEL_IDS)
    assert torch.allclose(scoring.lm_logits(model, hidden, token_ids=ids),
                          scoring.lm_logits(model, hidden)[:, ids], atol=1e-6)


def test_an_attention_cache_scores_the_queries_once_for_every_k(llama, source, monkeypatch):
    from vllm_deepthink.producers.compress import selection

    model, tokenizer = llama
    plain = {k: compress_adapter(source, model, tokenizer, QUERIES, prefix_len=k, dev_size=8,
                                 progress=False) for k in (6, 12)}
    calls = []
    real = selection.attention_scores
    monkeypatch.setattr(selection, "attention_scores",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cache: dict = {}
    for k in (6, 12):
        cached = compress_adapter(source, model, tokenizer, QUERIES, prefix_len=k, dev_size=8,
                                  progress=False, attention_cache=cache)
        assert all(torch.equal(a, b) for a, b in zip(cached.keys, plain[k].keys))
    assert len(calls) == 1 and len(cache) == 1


def test_an_imported_adapter_compresses_and_keeps_its_provenance_digest(llama):
    model, tokenizer = llama
    past_kv = imported(model, method="past-kv", virtual=20, specials=())
    adapter = compress_adapter(past_kv, model, tokenizer, QUERIES, prefix_len=5,
                               dev_size=4, progress=False)
    r = adapter.config.compression
    assert r["source_method"] == "past-kv" and adapter.config.label_calibration is None
    assert r["label_calibration"] == "the source has none"
    assert json.loads(json.dumps(r)) == r


def test_gemma3_sliding_layers_keep_only_positions_their_window_shows(llama, tmp_path):
    from tests.producers.test_builder import tiny_gemma3

    _, tokenizer = llama
    from vllm_deepthink.format import ModelFingerprint

    model = tiny_gemma3(sliding_window=16)  # layers: sliding, sliding, full
    # The same weights with a wide window give K/V for all 40 positions (an adapter holds
    # every position in every layer; a forward's sliding cache keeps only the last 15).
    source = noisy_adapter(tiny_gemma3(sliding_window=64), tokenizer, tmp_path / "wide", 40)
    source.config.fingerprint = ModelFingerprint.from_model(model)
    source.save_pretrained(tmp_path / "g")
    adapter = compress_adapter(source, model, tokenizer, QUERIES, prefix_len=8, dev_size=6,
                               distill=DistillSettings(steps=2, eval_every=2, batch_size=8),
                               progress=False)
    kept = torch.tensor(adapter.config.compression["selection"]["positions"])  # [3, 2, 8]
    assert (kept[:2] > 40 - 16).all()        # the first query token sees 25..39 there
    assert (kept[2, :, 0] == 0).all()        # the full layer keeps the sink
    assert model.config._attn_implementation != "eager"
    assert all(torch.isfinite(k).all() for k in adapter.keys)
