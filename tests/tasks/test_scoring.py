import pytest
import torch

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
def tiny_loaded(request):
    """(model, tokenizer) of the tiny Llama, then of the tiny GPT-2."""
    return request.getfixturevalue(f"tiny_{request.param}_loaded")


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


def test_items_cover_both_scoring_paths(tiny_loaded):
    # ITEMS[-1] has one-token choices (scored from the query alone), the others do not.
    _, tok = tiny_loaded
    lengths = [[len(tok(c, add_special_tokens=False)["input_ids"]) for c in item.choices]
               for item in ITEMS]
    assert lengths[-1] == [1, 1] and all(max(n) > 1 for n in lengths[:-1])


def test_zero_shot_matches_unbatched_forward(tiny_loaded):
    model, tok = tiny_loaded
    got = score_items_hf(model, tok, ITEMS, batch_size=3)
    assert_scores_close(got, reference_scores(model, tok, ITEMS, []))


def test_prefix_ids_match_concatenated_ids(tiny_loaded):
    model, tok = tiny_loaded
    prefix = tok(DEMOS)["input_ids"]
    got = score_items_hf(model, tok, ITEMS, prefix_ids=prefix, batch_size=4)
    assert_scores_close(got, reference_scores(model, tok, ITEMS, prefix))


def test_past_key_values_of_the_demos_equal_icl(tiny_loaded):
    model, tok = tiny_loaded
    prefix = tok(DEMOS)["input_ids"]
    with torch.no_grad():
        cache = model(torch.tensor([prefix]), use_cache=True).past_key_values
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    got = score_items_hf(model, tok, ITEMS, past_key_values=kv)
    assert_scores_close(got, score_items_hf(model, tok, ITEMS, prefix_ids=prefix), tol=1e-5)
    # The prefix tensors are not modified by scoring (each batch copies the cache).
    got_again = score_items_hf(model, tok, ITEMS, past_key_values=kv, batch_size=1)
    assert_scores_close(got_again, got, tol=1e-5)


def test_batch_size_does_not_change_scores(tiny_loaded):
    model, tok = tiny_loaded
    one = score_items_hf(model, tok, ITEMS, batch_size=1)
    assert_scores_close(score_items_hf(model, tok, ITEMS, batch_size=16), one, tol=1e-5)


def test_both_prefix_kinds_rejected(tiny_loaded):
    model, tok = tiny_loaded
    with pytest.raises(ValueError, match="not both"):
        score_items_hf(model, tok, ITEMS, prefix_ids=[1, 2], past_key_values=[])


def test_empty_choice_rejected(tiny_loaded):
    model, tok = tiny_loaded
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


# ----------------------------------------------------------------- the plan and the fast scorer

def legacy_score_encoded_hf(model, encoded, past_key_values=None, prefix_ids=None,
                            batch_size=16):
    """score_encoded_hf as it was before the shared plan (tasks/scoring.py at 869e495):
    one sequence per choice unless all choices are one token, every batch a deep copy
    of a batch-1 cache built with hf_cache.cache_from_kv. Kept as the reference the
    faster scorer must equal."""
    import copy

    from vllm_deepthink.format import hf_cache
    from vllm_deepthink.tasks.scoring import lm_logits

    with torch.no_grad():
        if past_key_values is not None:
            base = hf_cache.cache_from_kv([(k, v) for k, v in past_key_values], model.config)
            prefix_len = past_key_values[0][0].shape[-2]
        elif prefix_ids:
            out = model(input_ids=torch.tensor([list(prefix_ids)]), use_cache=True)
            base, prefix_len = out.past_key_values, len(prefix_ids)
        else:
            base, prefix_len = None, 0
        units = []
        for i, item in enumerate(encoded):
            q = len(item.query_ids)
            if all(len(c) == 1 for c in item.choice_ids):
                units.append((item.query_ids, [(q - 1, c[0], i, j)
                                               for j, c in enumerate(item.choice_ids)]))
                continue
            for j, choice in enumerate(item.choice_ids):
                units.append((item.query_ids + choice,
                              [(q + k - 1, t, i, j) for k, t in enumerate(choice)]))
        units.sort(key=lambda u: -len(u[0]))
        totals = [[0.0] * len(item.choice_ids) for item in encoded]
        for start in range(0, len(units), batch_size):
            batch = units[start:start + batch_size]
            width = max(len(s) for s, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), prefix_len + width), dtype=torch.long)
            for row, (s, _) in enumerate(batch):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :prefix_len + len(s)] = 1
            cache = None
            if base is not None:
                cache = copy.deepcopy(base)
                cache.batch_repeat_interleave(len(batch))
            hidden = model.base_model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                      use_cache=cache is not None).last_hidden_state
            rows = [r for r, (_, es) in enumerate(batch) for _ in es]
            entries = [e for _, es in batch for e in es]
            sel = hidden[torch.tensor(rows), torch.tensor([e[0] for e in entries])]
            lp = torch.log_softmax(lm_logits(model, sel), dim=-1)
            picked = lp[torch.arange(len(entries)), torch.tensor([e[1] for e in entries])]
            for (_, _, i, j), v in zip(entries, picked.double().tolist()):
                totals[i][j] += v
    return [[(totals[i][j], len(c)) for j, c in enumerate(item.choice_ids)]
            for i, item in enumerate(encoded)]


def _demo_kv(model, tok):
    with torch.no_grad():
        cache = model(torch.tensor([tok(DEMOS)["input_ids"]]), use_cache=True).past_key_values
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.mark.parametrize("prefix", ["none", "ids", "kv"])
def test_fast_scorer_equals_legacy_score_encoded_hf(tiny_loaded, prefix):
    from vllm_deepthink.tasks.scoring import encode_items, score_encoded_hf

    model, tok = tiny_loaded
    encoded = encode_items(tok, ITEMS * 3)
    kwargs = {"none": {}, "ids": {"prefix_ids": tok(DEMOS)["input_ids"]},
              "kv": {"past_key_values": _demo_kv(model, tok)}}[prefix]
    for batch_size in (1, 3, 16):
        assert_scores_close(score_encoded_hf(model, encoded, batch_size=batch_size, **kwargs),
                            legacy_score_encoded_hf(model, encoded, batch_size=4, **kwargs),
                            tol=1e-5)


def test_fast_scorer_equals_legacy_on_sliding_window_layers():
    """Gemma 3 style sliding-window layers with a prefix longer than the window - 1:
    full-length K/V (an adapter's) and an ICL prefix (a forward's clipped cache)."""
    from tests.producers.test_builder import tiny_gemma3
    from vllm_deepthink.tasks.scoring import EncodedItem, score_encoded_hf

    model = tiny_gemma3(sliding_window=16)
    twin = tiny_gemma3(sliding_window=64)  # same weights; keeps all 24 positions
    prefix_ids = list(range(5, 5 + 24))
    with torch.no_grad():
        cache = twin(torch.tensor([prefix_ids]), use_cache=True).past_key_values
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert all(k.shape[-2] == 24 for k, _ in kv)
    encoded = [EncodedItem([40, 41, 42], [[7], [8], [9, 10]]), EncodedItem([50], [[7], [8]]),
               EncodedItem([60, 61, 62, 63, 64], [[11, 12, 13], [14]])]
    for kwargs in ({"past_key_values": kv}, {"prefix_ids": prefix_ids}):
        got = score_encoded_hf(model, encoded, batch_size=2, **kwargs)
        assert_scores_close(got, legacy_score_encoded_hf(model, encoded, **kwargs), tol=1e-5)


def test_scoring_never_writes_the_prefix(tiny_loaded):
    from vllm_deepthink.tasks.scoring import encode_items, score_encoded_hf

    model, tok = tiny_loaded
    kv = _demo_kv(model, tok)
    before = [(k.clone(), v.clone()) for k, v in kv]
    score_encoded_hf(model, encode_items(tok, ITEMS), past_key_values=kv, batch_size=3)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, before))


def test_shared_prefix_cache_holds_views_not_copies(tiny_loaded):
    from vllm_deepthink.format import hf_cache

    model, tok = tiny_loaded
    kv = _demo_kv(model, tok)
    cache = hf_cache.shared_prefix_cache(kv, model.config, batch_size=5)
    for layer, (k, v) in zip(cache.layers, kv):
        assert layer.keys.shape[0] == 5 and layer.keys.data_ptr() == k.data_ptr()
        assert layer.values.data_ptr() == v.data_ptr()
    assert cache.get_seq_length() == kv[0][0].shape[-2]


def test_plan_units():
    from vllm_deepthink.tasks.scoring import FORCED, NEXT, EncodedItem, _hf_runs, make_plan

    plan = make_plan([EncodedItem([1, 2], [[3, 4, 5], [6], [7]]),   # TREC-like
                      EncodedItem([8], [[9], [10]]),                # single tokens only
                      EncodedItem([11], [[12, 13], [14, 15]])])     # multiple choice
    kinds = [(u.item, u.kind) for u in plan.units]
    assert kinds == [(0, NEXT), (0, FORCED), (1, NEXT), (2, FORCED), (2, FORCED)]
    assert plan.units[0].entries == [(1, 6, 1), (1, 7, 2)]
    assert plan.units[1].ids == [1, 2, 3, 4, 5]
    assert plan.units[1].entries == [(1, 3, 0), (2, 4, 0), (3, 5, 0)]
    assert plan.units[1].scored_from == 2
    for unit in plan.units:  # FORCED targets are the unit's own next tokens
        if unit.kind == FORCED:
            assert all(unit.ids[p + 1] == t for p, t, _ in unit.entries)
        else:
            assert all(p == len(unit.ids) - 1 for p, _, _ in unit.entries)
    runs = _hf_runs(plan)
    # item 0 is one HF sequence (its single-token choices ride in the FORCED unit),
    # trimmed to the last scored position
    assert sorted(r.ids for r in runs) == [[1, 2, 3, 4], [8], [11, 12], [11, 14]]
    assert plan.choice_lengths == [[3, 1, 1], [1, 1], [2, 2]]
