import pytest
import torch

from tests.helpers.tiny_models import load_tiny
from vllm_deepthink.tasks.scoring import (ChoiceItem, accuracy, items_from_rows, predictions,
                                    score_items_hf)

ITEMS = [
    ChoiceItem("Review: a charming film\nSentiment:", [" positive", " negative"], 0),
    ChoiceItem("Question: who wrote Hamlet ?\nType:", [" HUM", " LOC", " the lazy dog"], 0),
    ChoiceItem("The quick brown fox", [" jumps over", " is"], 1),
    ChoiceItem("Review: a charming film\nSentiment:", [" the", " is"], 1),
]
DEMOS = "Review: contains no wit\nSentiment: negative\n\n"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.getbasetemp() / f"tiny-{request.param}"
    return load_tiny(request.param, directory)


def reference_scores(model, tok, items, prefix_ids):
    """One unbatched forward over prefix + query + choice ids per choice."""
    out = []
    for item in items:
        query = tok(item.query, add_special_tokens=False)["input_ids"]
        row = []
        for choice in item.choices:
            cids = tok(choice, add_special_tokens=False)["input_ids"]
            ids = list(prefix_ids) + query + cids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            start = len(ids) - len(cids)
            row.append((sum(logp[start + k - 1, t].item() for k, t in enumerate(cids)),
                        len(cids)))
        out.append(row)
    return out


def assert_scores_close(got, expected, tol=1e-4):
    assert [[n for _, n in r] for r in got] == [[n for _, n in r] for r in expected]
    for row_got, row_exp in zip(got, expected):
        for (a, _), (b, _) in zip(row_got, row_exp):
            assert a == pytest.approx(b, abs=tol)


def test_items_cover_both_scoring_paths(tiny):
    # ITEMS[-1] has one-token choices (scored from the query alone), the others do not.
    _, tok = tiny
    lengths = [[len(tok(c, add_special_tokens=False)["input_ids"]) for c in item.choices]
               for item in ITEMS]
    assert lengths[-1] == [1, 1] and all(max(n) > 1 for n in lengths[:-1])


def test_zero_shot_matches_unbatched_forward(tiny):
    model, tok = tiny
    got = score_items_hf(model, tok, ITEMS, batch_size=3)
    assert_scores_close(got, reference_scores(model, tok, ITEMS, []))


def test_prefix_ids_match_concatenated_ids(tiny):
    model, tok = tiny
    prefix = tok(DEMOS)["input_ids"]
    got = score_items_hf(model, tok, ITEMS, prefix_ids=prefix, batch_size=4)
    assert_scores_close(got, reference_scores(model, tok, ITEMS, prefix))


def test_past_key_values_of_the_demos_equal_icl(tiny):
    model, tok = tiny
    prefix = tok(DEMOS)["input_ids"]
    with torch.no_grad():
        cache = model(torch.tensor([prefix]), use_cache=True).past_key_values
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    got = score_items_hf(model, tok, ITEMS, past_key_values=kv)
    assert_scores_close(got, score_items_hf(model, tok, ITEMS, prefix_ids=prefix), tol=1e-5)
    # The prefix tensors are not modified by scoring (each batch copies the cache).
    got_again = score_items_hf(model, tok, ITEMS, past_key_values=kv, batch_size=1)
    assert_scores_close(got_again, got, tol=1e-5)


def test_batch_size_does_not_change_scores(tiny):
    model, tok = tiny
    one = score_items_hf(model, tok, ITEMS, batch_size=1)
    assert_scores_close(score_items_hf(model, tok, ITEMS, batch_size=16), one, tol=1e-5)


def test_both_prefix_kinds_rejected(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="not both"):
        score_items_hf(model, tok, ITEMS, prefix_ids=[1, 2], past_key_values=[])


def test_empty_choice_rejected(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        score_items_hf(model, tok, [ChoiceItem("hello", ["", " x"], 0)])


def test_items_from_rows_uses_task_formatting(tmp_path):
    from vllm_deepthink.tasks import load_task

    d = tmp_path / "t"
    d.mkdir()
    (d / "task.json").write_text('{"kind": "classification", "template": "X: {text}\\nY: '
                                 '{label}", "label_words": ["a", "b"]}')
    (d / "train.jsonl").write_text('{"text": "hi", "label": 1}\n')
    (d / "test.jsonl").write_text('{"text": "hi", "label": 1}\n')
    task = load_task(d)
    assert items_from_rows(task, task.rows("test")) == [ChoiceItem("X: hi\nY:", [" a", " b"], 1)]


def test_predictions_and_accuracy():
    scores = [
        [(-2.0, 1), (-3.0, 3)],   # sum -> 0, mean -> 1
        [(-1.0, 1), (-1.0, 1)],   # tie -> lowest index
        [(-5.0, 1), (-4.0, 2)],   # sum -> 1, mean -> 1
    ]
    assert predictions(scores) == [0, 0, 1]
    assert predictions(scores, normalize=True) == [1, 0, 1]
    assert accuracy(scores, [0, 0, 0]) == {"acc": 2 / 3, "acc_norm": 1 / 3, "n": 3}
    with pytest.raises(ValueError, match="2 labels"):
        accuracy(scores, [0, 0])
