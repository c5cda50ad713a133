"""Evaluation: vLLM and HF scorers agree; T=1 Deep-Thinking == ICL; the eval CLI."""

import json

import pytest

from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.producers.deepthink.builder import build_adapter
from vllm_deepthink.apps.errors import UsageError
from vllm_deepthink.apps.eval import cli as eval_cmd
from vllm_deepthink.apps.eval.evaluate import evaluate
from vllm_deepthink.apps.eval.modes import MODES
from vllm_deepthink.apps.eval.scorers import load_adapter_for, make_scorer
from vllm_deepthink.tasks.scoring import EncodedItem, HFScorer, encode_items, items_from_rows
from vllm_deepthink.tasks import load_task, sample_demos

pytestmark = pytest.mark.engine

TASK_JSON = {"kind": "classification", "template": "Review: {text}\nSentiment: {label}",
             "label_words": ["negative", "positive"]}
TEXTS = ["a charming film", "contains no wit , only labored gags", "the quick brown fox",
         "lazy dog", "what is the capital of France ?", "the sun was rising",
         "the grass was cut", "who wrote Hamlet ?", "0123456789 jumps over", "a film"]


def write_task(directory, spec=TASK_JSON, n_train=12, n_test=10):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "task.json").write_text(json.dumps(spec))
    rows = [{"text": TEXTS[i % len(TEXTS)], "label": (i * 7 // 3) % 2}
            for i in range(n_train + n_test)]
    (directory / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (directory / "test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return directory


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    model_dir = tiny_llama_dir
    model, tok = load_tiny("llama", model_dir)
    task = load_task(write_task(base / "sent"))
    demos = sample_demos(task, shots_per_class=2, seed=0)
    adapters = {}
    for name, iterations in (("t1", 1), ("t3", 3)):
        adapter = build_adapter(model, tok, demos.text, iterations=iterations,
                                task=task.to_dict(), base_model_name_or_path=str(model_dir),
                                progress=False)
        adapter.save_pretrained(base / name)
        adapters[name] = load_adapter_for(model_dir, base / name)
    items = items_from_rows(task, task.rows("test"))
    encoded = encode_items(tok, items)
    return dict(base=base, model_dir=model_dir, model=model, tok=tok, task=task,
                adapters=adapters, encoded=encoded)


@pytest.fixture(scope="module")
def vllm_scorer(setup):
    scorer = make_scorer(
        "vllm", setup["model_dir"], {}, {n: setup["base"] / n for n in setup["adapters"]},
        max_len=200, progress=False, block_size=32, disable_log_stats=False)
    yield scorer
    scorer.close()


def assert_close(a, b, tol=1e-4):
    assert [[n for _, n in row] for row in a] == [[n for _, n in row] for row in b]
    worst = max(abs(x - y) for ra, rb in zip(a, b) for (x, _), (y, _) in zip(ra, rb))
    assert worst < tol, worst


def mode_kwargs(setup, mode):
    if mode == "zero-shot":
        return {"prefix_ids": list(setup["tok"]("")["input_ids"])}
    if mode == "icl":
        return {"prefix_ids": setup["adapters"]["t3"].config.demo_token_ids}
    return {"adapter": "t3"}


@pytest.mark.parametrize("mode", ["zero-shot", "icl", "deepthink"])
def test_vllm_and_hf_scores_agree(setup, vllm_scorer, mode):
    hf = HFScorer(setup["model"], setup["adapters"], batch_size=5)
    kwargs = mode_kwargs(setup, mode)
    assert_close(vllm_scorer.score(setup["encoded"], **kwargs),
                 hf.score(setup["encoded"], **kwargs))


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_one_iteration_deep_thinking_equals_icl(setup, vllm_scorer, engine):
    scorer = vllm_scorer if engine == "vllm" else HFScorer(setup["model"], setup["adapters"])
    icl = scorer.score(setup["encoded"], prefix_ids=setup["adapters"]["t1"].config.demo_token_ids)
    assert_close(scorer.score(setup["encoded"], adapter="t1"), icl, tol=1e-4)
    # More iterations do change the prefix (so the comparison above can fail).
    t3 = scorer.score(setup["encoded"], adapter="t3")
    assert max(abs(a[0] - b[0]) for ra, rb in zip(t3, icl) for a, b in zip(ra, rb)) > 1e-3


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def prefix_cache_hits(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


@pytest.mark.parametrize("mode", ["zero-shot", "icl", "deepthink"])
def test_single_token_choices_scored_at_the_next_position_match_hf(setup, vllm_scorer, mode):
    tok = setup["tok"]
    vocab = sorted(set(ids(tok, " ".join(TEXTS))))
    items = [EncodedItem(ids(tok, text + " :"), [[t] for t in vocab[k:k + 3]])
             for k, text in enumerate(TEXTS[:4])]
    hf = HFScorer(setup["model"], setup["adapters"], batch_size=5)
    kwargs = mode_kwargs(setup, mode)
    assert_close(vllm_scorer.score(items, **kwargs), hf.score(items, **kwargs))


def test_multi_token_choices_read_cached_demos_and_stay_exact(setup, vllm_scorer):
    """Choices sharing 40 tokens: the second pass finds every block of every prompt
    cached; the scored positions must still be computed (compat.local_hit_cap)."""
    tok, llm = setup["tok"], vllm_scorer.llm
    demos = setup["adapters"]["t3"].config.demo_token_ids
    shared = (ids(tok, " the quick brown fox jumps over the lazy dog") * 8)[:40]
    items = [EncodedItem(ids(tok, "who wrote Hamlet ?"),
                         [shared + ids(tok, " a film"), shared + ids(tok, " the sun"),
                          ids(tok, " no")])]
    expected = HFScorer(setup["model"], setup["adapters"]).score(items, prefix_ids=demos)
    first = vllm_scorer.score(items, prefix_ids=demos)
    before = prefix_cache_hits(llm)
    second = vllm_scorer.score(items, prefix_ids=demos)
    # Each prompt reads its cached blocks up to the last one before its choice.
    start = len(demos) + len(items[0].query_ids)
    assert start - 1 >= 32 and len(shared) > 32, "the test needs cached blocks on both sides"
    assert prefix_cache_hits(llm) - before == 3 * ((start - 1) // 32 * 32)
    assert_close(first, expected)
    assert_close(second, expected)


def test_evaluate_with_both_engines_gives_same_predictions(setup, vllm_scorer):
    task, rows = setup["task"], setup["task"].rows("test")
    kwargs = dict(task=task, rows=rows, modes=list(MODES),
                  adapter=setup["adapters"]["t3"], adapter_name="t3", progress=False)
    with_vllm = evaluate(vllm_scorer, setup["tok"], **kwargs)
    with_hf = evaluate(HFScorer(setup["model"], setup["adapters"]), setup["tok"],
                                  **kwargs)
    assert with_vllm["predictions"] == with_hf["predictions"]
    assert with_vllm["metrics"] == with_hf["metrics"]
    assert with_vllm["prefix_tokens"] == {"zero-shot": 1, "icl": 
                                          setup["adapters"]["t3"].prefix_len,
                                          "deepthink": setup["adapters"]["t3"].prefix_len}


def run_cli(argv):
    from vllm_deepthink.apps import cli

    return cli.main(argv)


def test_cli_custom_task_end_to_end(setup, tmp_path):
    spec = {"kind": "multiple_choice", "template": "Q: {question}\nA: {choice}",
            "separator": "\n"}
    task_dir = tmp_path / "mc"
    task_dir.mkdir()
    (task_dir / "task.json").write_text(json.dumps(spec))
    rows = [{"question": TEXTS[i], "choices": [TEXTS[(i + 1) % 10], TEXTS[(i + 2) % 10]],
             "label": i % 2} for i in range(10)]
    (task_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (task_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    model, tok = setup["model"], setup["tok"]
    task = load_task(task_dir)
    adapter = build_adapter(model, tok, sample_demos(task, 2, seed=1).text, iterations=2,
                            progress=False)
    adapter.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "eval.json"
    assert run_cli(["eval", "--model", str(setup["model_dir"]), "--task-dir", str(task_dir),
                    "--adapter", str(tmp_path / "adapter"), "--engine", "hf",
                    "--output-json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["task"]["template"] == spec["template"]
    assert result["settings"]["split"] == "test"
    assert result["labels"] == [r["label"] for r in rows[6:]]
    for mode in MODES:
        preds, metrics = result["predictions"][mode], result["metrics"][mode]
        assert metrics["n"] == len(preds) == 4
        assert metrics["acc"] == sum(p == y for p, y in zip(preds, result["labels"])) / 4
    # The same scores by hand: deepthink = the adapter's K/V as HF past_key_values.
    from vllm_deepthink.tasks.scoring import predictions, score_items_hf

    items = items_from_rows(task, task.rows("test"))
    scores = score_items_hf(model, tok, items, past_key_values=adapter.as_past_key_values())
    assert result["predictions"]["deepthink"] == predictions(scores)


def test_cli_limit_and_modes(setup, tmp_path):
    out = tmp_path / "zs.json"
    run_cli(["eval", "--model", str(setup["model_dir"]), "--task-dir",
             str(setup["task"].directory), "--engine", "hf", "--limit", "3", "--seed", "2",
             "--output-json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert list(result["metrics"]) == ["zero-shot"] and result["metrics"]["zero-shot"]["n"] == 3


def test_cli_bad_task_dir_is_a_clear_error(setup, tmp_path):
    bad = write_task(tmp_path / "bad", spec={**TASK_JSON, "template": "Sentiment: {label}"})
    with pytest.raises(SystemExit, match=r"eval: error: .*no \{text\} placeholder"):
        run_cli(["eval", "--model", str(setup["model_dir"]), "--task-dir", str(bad),
                 "--engine", "hf"])
    with pytest.raises(SystemExit, match="eval: error: .*task.json is missing"):
        run_cli(["eval", "--model", str(setup["model_dir"]), "--task-dir", str(tmp_path),
                 "--engine", "hf"])


def test_modes_need_an_adapter():
    with pytest.raises(UsageError, match="need `adapter`"):
        eval_cmd.parse_modes("zero-shot,icl", has_adapter=False)
    with pytest.raises(UsageError, match="unknown mode"):
        eval_cmd.parse_modes("fewshot", has_adapter=True)
    # the command line names its flags (the modes are checked before the model is read)
    with pytest.raises(SystemExit, match="^vllm-deepthink eval: error: --modes icl need --adapter"):
        run_cli(["eval", "--model", "unread", "--modes", "zero-shot,icl", "--engine", "hf"])
    assert eval_cmd.parse_modes(None, has_adapter=True) == list(MODES)


def test_served_calibration_through_logit_bias(setup, vllm_scorer):
    """A calibrated answer served through vLLM's own per-request fields: greedy with
    allowed_token_ids = the label tokens and logit_bias = -log prior gives the
    calibrated argmax; the returned logprobs stay the raw ones (logit_bias is applied
    after vLLM's raw_logprobs are taken)."""
    from vllm_deepthink.plugin import api
    from vllm_deepthink.tasks import calibration

    tok, llm = setup["tok"], vllm_scorer.llm
    labels = [ids(tok, " the")[0], ids(tok, " is")[0]]
    queries = [ids(tok, text + " :") for text in TEXTS]
    encoded = [EncodedItem(q, [[t] for t in labels]) for q in queries]
    raw = HFScorer(setup["model"], setup["adapters"]).score(encoded, adapter="t3")
    odds = sorted(s[0][0] - s[1][0] for s in raw)
    k = len(odds) // 2  # a prior that moves the decision between two middle log-odds
    m = (odds[k - 1] + odds[k]) / 2
    assert odds[k] - odds[k - 1] > 1e-3, "no tie at the threshold"
    prior = [m / 2, -m / 2]
    want = calibration.calibrated_predictions(raw, prior)
    assert want != [max((0, 1), key=lambda j: (s[j][0], -j)) for s in raw], "must flip some"
    bias = calibration.logit_bias(labels, prior)
    params = api.sampling_params(adapter="t3", max_tokens=1, temperature=0.0,
                                 allowed_token_ids=labels, logit_bias=bias,
                                 logprob_token_ids=labels)
    outputs = llm.generate([{"prompt_token_ids": q} for q in queries], params, use_tqdm=False)
    served = [labels.index(out.outputs[0].token_ids[0]) for out in outputs]
    assert served == want
    for out, scores in zip(outputs, raw):
        (step,) = out.outputs[0].logprobs
        assert [step[t].logprob for t in labels] == pytest.approx([s for s, _ in scores],
                                                                   abs=1e-4)
