"""Label calibration: content-free and dev-prior against a hand computation."""

import math

import pytest
import torch

from vllm_deepthink.tasks import calibration
from vllm_deepthink.tasks.scoring import ChoiceItem, score_items_hf

LABELS = [" the", " is"]  # one token each in the tiny tokenizer
QUERIES = ["Review: a charming film\nSentiment:", "Question: who wrote Hamlet ?\nType:",
           "The quick brown fox", "Premise: the sun was rising. Answer:"]
DEMOS = "Review: contains no wit\nSentiment: is\n\n"


def hand_label_probs(model, tok, prefix, query):
    """p(label | prefix + query) renormalized over the two labels, from one plain forward."""
    ids = tok(prefix)["input_ids"] + tok(query, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    label_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in LABELS]
    assert all(len(i) == 1 for i in label_ids)
    p = torch.softmax(logits, -1)[[i[0] for i in label_ids]]
    return (p / p.sum()).tolist()


def test_content_free_and_dev_prior_match_a_hand_computation(tiny_llama_loaded):
    model, tok = tiny_llama_loaded
    prefix_ids = tok(DEMOS)["input_ids"]
    cf_queries = [f"Review: {x}\nSentiment:" for x in calibration.CONTENT_FREE_INPUTS]
    items = [ChoiceItem(q, LABELS, 0) for q in QUERIES]
    cf_items = [ChoiceItem(q, LABELS, 0) for q in cf_queries]
    scores = score_items_hf(model, tok, items, prefix_ids=prefix_ids)
    cf_scores = score_items_hf(model, tok, cf_items, prefix_ids=prefix_ids)

    hand_p = [hand_label_probs(model, tok, DEMOS, q) for q in QUERIES]
    hand_cf = [hand_label_probs(model, tok, DEMOS, q) for q in cf_queries]
    for name, got_scores, inputs in (("dev-prior", scores, hand_p),
                                     ("content-free", cf_scores, hand_cf)):
        prior = [sum(p[j] for p in inputs) / len(inputs) for j in range(2)]
        got = calibration.log_prior(got_scores)
        assert got == pytest.approx([math.log(x) for x in prior], abs=1e-4), name
        # calibrated prediction = argmax p_j / prior_j (Zhao et al.: W = diag(prior)^-1)
        want = [max(range(2), key=lambda j: (p[j] / prior[j], -j)) for p in hand_p]
        assert calibration.calibrated_predictions(scores, got) == want, name
        calibrated = calibration.calibrated(scores, got)
        for row, p in zip(calibrated, hand_p):
            assert row == pytest.approx([math.log(p[j] / prior[j]) for j in range(2)],
                                        abs=1e-4)


def test_calibration_can_flip_a_biased_argmax():
    # every item prefers label 0; the prior says label 0 is 9x more likely overall
    scores = [[(math.log(0.8), 1), (math.log(0.2), 1)], [(math.log(0.95), 1),
                                                         (math.log(0.05), 1)]]
    prior = [math.log(0.9), math.log(0.1)]
    assert calibration.calibrated_predictions(scores, prior) == [1, 0]
    assert calibration.calibrated_predictions(scores, [0.0, 0.0]) == [0, 0]


def test_normalized_prior_uses_mean_per_token_scores():
    scores = [[(-2.0, 2), (-1.5, 1)]]
    plain = calibration.log_prior(scores)
    norm = calibration.log_prior(scores, normalize=True)
    assert plain == pytest.approx(calibration.log_softmax([-2.0, -1.5]))
    assert norm == pytest.approx(calibration.log_softmax([-1.0, -1.5]))


def test_prior_needs_a_fixed_label_set():
    with pytest.raises(ValueError, match="same choices"):
        calibration.log_prior([[(-1.0, 1), (-2.0, 1)], [(-1.0, 1), (-2.0, 1), (-3.0, 1)]])


def test_content_free_rows_go_through_the_template(tmp_path):
    import json

    from vllm_deepthink.tasks import load_task
    from vllm_deepthink.tasks.scoring import items_from_rows

    d = tmp_path / "t"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({"kind": "classification",
                                             "template": "T: {title}\nX: {text}\nY: {label}",
                                             "label_words": ["a", "b"]}))
    (d / "train.jsonl").write_text('{"title": "t", "text": "hi", "label": 1}\n')
    (d / "test.jsonl").write_text('{"title": "t", "text": "hi", "label": 1}\n')
    task = load_task(d)
    items = items_from_rows(task, calibration.content_free_rows(task))
    assert [i.query for i in items] == ["T: N/A\nX: N/A\nY:", "T: \nX: \nY:",
                                        "T: [MASK]\nX: [MASK]\nY:"]
    assert items[0].choices == [" a", " b"]


def test_logit_bias_is_minus_the_log_prior_clamped():
    assert calibration.logit_bias([7, 9], [math.log(0.25), -200.0]) == {
        7: pytest.approx(-math.log(0.25)), 9: 100.0}
