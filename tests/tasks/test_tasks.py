import json
from collections import Counter

import pytest

from vllm_deepthink.tasks import (BUILTIN_TASKS, TaskError, dev_split, eval_rows, load_task,
                                  sample_demos)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_task_dir(tmp_path, spec, train=None, test=None, name="mytask"):
    d = tmp_path / name
    d.mkdir()
    if spec is not None:
        (d / "task.json").write_text(json.dumps(spec) if not isinstance(spec, str) else spec)
    train = train if train is not None else [
        {"text": f"text {i}", "label": i % 2} for i in range(20)]
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "test.jsonl", test if test is not None else train[:4])
    return d


CLS_SPEC = {"kind": "classification", "template": "Input: {text}\nAnswer: {label}",
            "label_words": ["no", "yes"]}


# ------------------------------------------------------------------ built-in tasks

def test_sst2_prompt_matches_published_format(data_dir):
    task = load_task(data_dir / "sst2")
    row = {"text": "a charming film", "label": 1}
    assert task.format_query(row) == "Review: a charming film\nSentiment:"
    assert task.choices(row) == [" negative", " positive"]
    assert task.format_demo(row) == "Review: a charming film\nSentiment: positive"
    assert task.separator == "\n\n"
    assert task.eval_split == "test"


@pytest.mark.parametrize("name,split", [("sst5", "validation"), ("mr", "validation"),
                                        ("copa", "validation"), ("openbookqa", "validation"),
                                        ("sst2", "test"), ("agnews", "test"), ("trec", "test"),
                                        ("qasc", "test"), ("hellaswag", "test"),
                                        ("winogrande", "test")])
def test_builtin_eval_split_is_the_papers(data_dir, name, split):
    assert load_task(data_dir / name).eval_split == split


def test_all_builtin_tasks_load_and_format(data_dir):
    for name in BUILTIN_TASKS:
        task = load_task(data_dir / name)
        row = task.rows(task.eval_split)[0]
        choices = task.choices(row)
        assert len(choices) >= 2 and all(c.startswith(" ") for c in choices)
        assert not task.format_query(row).endswith(" ")
        assert task.format_demo(row) == task.format_query(row) + choices[task.label(row)]


def test_label_words_come_from_verbalizers(data_dir):
    words = json.loads((data_dir / "trec" / "verbalizers.json").read_text())
    assert load_task(data_dir / "trec").label_words == words


def test_copa_uses_because_or_therefore(data_dir):
    task = load_task(data_dir / "copa")
    cause = {"question": "My body cast a shadow.", "choices": ["The sun was rising.", "x."],
             "label": 0, "asks_for": "cause"}
    assert task.format_query(cause) == "My body cast a shadow because"
    assert task.format_demo(cause) == "My body cast a shadow because The sun was rising."
    effect = {**cause, "asks_for": "effect"}
    assert task.format_query(effect) == "My body cast a shadow therefore"


def test_winogrande_continuation_holds_option_and_rest(data_dir):
    task = load_task(data_dir / "winogrande")
    row = {"question": "Ian ate it because _ liked it.", "choices": ["Ian", "Dennis"],
           "label": 1}
    assert task.format_query(row) == "Ian ate it because"
    assert task.choices(row) == [" Ian liked it.", " Dennis liked it."]


def test_openbookqa_choice_ends_with_period(data_dir):
    task = load_task(data_dir / "openbookqa")
    row = {"question": "Stars are", "choices": ["balls of gas", "cold"], "label": 0}
    assert task.format_demo(row) == "Stars are balls of gas."


# ------------------------------------------------------------------ demos and dev

def test_sample_demos_is_stratified_and_seeded(data_dir):
    task = load_task(data_dir / "trec")
    demos = sample_demos(task, shots_per_class=2, seed=3)
    train = task.rows("train")
    labels = Counter(task.label(train[i]) for i in demos.indices)
    assert labels == {k: 2 for k in range(6)}
    expected = "".join(task.format_demo(train[i]) + "\n\n" for i in demos.indices)
    assert demos.text == expected
    assert sample_demos(task, 2, 3).indices == demos.indices
    assert sample_demos(task, 2, 4).indices != demos.indices


def test_sample_demos_multiple_choice_counts_demos(data_dir):
    task = load_task(data_dir / "copa")
    demos = sample_demos(task, shots_per_class=4, seed=0)
    assert len(demos.indices) == len(set(demos.indices)) == 4
    assert demos.text.endswith("\n\n") and demos.text.count("\n\n") == 4


def test_dev_split_excludes_demos_and_is_stratified(tmp_path):
    train = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, train=train))
    demos = sample_demos(task, 2, seed=0)
    dev = dev_split(task, size=10, seed=0, exclude=set(demos.indices), stratify=True)
    demo_texts = {train[i]["text"] for i in demos.indices}
    assert len(dev) == 10 and not demo_texts & {r["text"] for r in dev}
    assert Counter(r["label"] for r in dev) == {0: 5, 1: 5}
    assert len(dev_split(task, size=1000, seed=0, exclude=set(demos.indices))) == 36


def test_too_few_rows_of_a_label(tmp_path):
    train = [{"text": "a", "label": 0}] * 5 + [{"text": "b", "label": 1}]
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, train=train))
    with pytest.raises(TaskError, match="1 rows of label 1 .*'yes'.*fewer than"):
        sample_demos(task, 2, seed=0)


def test_eval_rows_limit_is_seeded_subset_in_file_order(tmp_path):
    test = [{"text": f"t{i}", "label": i % 2} for i in range(30)]
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, test=test))
    subset = eval_rows(task, limit=7, seed=1)
    assert len(subset) == 7 and subset == eval_rows(task, limit=7, seed=1)
    positions = [test.index(r) for r in subset]
    assert positions == sorted(positions)
    assert eval_rows(task) == test


# ------------------------------------------------------------------ user tasks

def test_user_classification_task(tmp_path):
    task = load_task(make_task_dir(tmp_path, {**CLS_SPEC, "separator": "\n###\n"}))
    row = {"text": "  hello  ", "label": 1}
    assert task.name == "mytask" and task.kind == "classification"
    assert task.format_query(row) == "Input: hello\nAnswer:"
    assert task.choices(row) == [" no", " yes"]
    assert sample_demos(task, 1, 0).text.count("\n###\n") == 2
    assert task.to_dict()["template"] == CLS_SPEC["template"]


def test_user_template_may_use_other_row_fields(tmp_path):
    spec = {"kind": "classification", "label_words": ["no", "yes"],
            "template": "Premise: {premise}\nHypothesis: {text}\nEntailed? {label}"}
    train = [{"premise": "p", "text": "h", "label": 0}, {"premise": "q", "text": "g", "label": 1}]
    task = load_task(make_task_dir(tmp_path, spec, train=train))
    assert task.format_demo(train[1]) == "Premise: q\nHypothesis: g\nEntailed? yes"


def test_user_multiple_choice_task(tmp_path):
    spec = {"kind": "multiple_choice", "template": "Q: {question}\nA: {choice}"}
    train = [{"question": "2+2?", "choices": ["4", "5", "6"], "label": 0}] * 3
    task = load_task(make_task_dir(tmp_path, spec, train=train))
    assert task.choices(train[0]) == [" 4", " 5", " 6"]
    assert task.format_query(train[0]) == "Q: 2+2?\nA:"


# ------------------------------------------------------------------ bad task dirs

@pytest.mark.parametrize("spec,message", [
    ({**CLS_SPEC, "template": "Answer: {label}"}, r"no \{text\} placeholder"),
    ({**CLS_SPEC, "template": "Answer: {text}"}, r"must contain \{label\} exactly once"),
    ({**CLS_SPEC, "template": "{label} {text}"}, r"\{text\} must come before \{label\}"),
    ({**CLS_SPEC, "kind": "regression"}, "'kind' must be one of"),
    ({k: v for k, v in CLS_SPEC.items() if k != "label_words"}, "'label_words' is missing"),
    ({**CLS_SPEC, "label_words": ["only"]}, "at least two non-empty strings"),
    ({**CLS_SPEC, "labelwords": ["a", "b"]}, r"unknown keys \['labelwords'\]"),
    ({"kind": "multiple_choice", "template": "{text} {label}"}, r"no \{question\} placeholder"),
    ("{not json", "task.json: not valid JSON"),
])
def test_bad_task_json(tmp_path, spec, message):
    with pytest.raises(TaskError, match=message):
        load_task(make_task_dir(tmp_path, spec))


def test_missing_task_json_for_unknown_task(tmp_path):
    with pytest.raises(TaskError, match="task.json is missing and 'mytask' is not a built-in"):
        load_task(make_task_dir(tmp_path, None))


def test_missing_train_file(tmp_path):
    d = make_task_dir(tmp_path, CLS_SPEC)
    (d / "train.jsonl").unlink()
    with pytest.raises(TaskError, match="train.jsonl is missing"):
        load_task(d)


def test_missing_directory(tmp_path):
    with pytest.raises(TaskError, match="no such task directory"):
        load_task(tmp_path / "nope")


def test_label_out_of_range(tmp_path):
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, train=[{"text": "a", "label": 2}]))
    with pytest.raises(TaskError, match=r"train.jsonl:1: 'label' must be an integer in \[0, 1\]"):
        task.rows("train")


def test_bad_jsonl_line_names_the_line(tmp_path):
    d = make_task_dir(tmp_path, CLS_SPEC)
    with (d / "train.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(TaskError, match="train.jsonl:21: not valid JSON"):
        load_task(d).rows("train")


def test_row_missing_template_field(tmp_path):
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, train=[{"sentence": "a", "label": 0}]))
    with pytest.raises(TaskError, match=r"uses \{text\} but the row has no string field"):
        task.rows("train")


def test_multiple_choice_row_without_choices(tmp_path):
    spec = {"kind": "multiple_choice", "template": "{question} {choice}"}
    task = load_task(make_task_dir(tmp_path, spec, train=[{"question": "q", "label": 0}]))
    with pytest.raises(TaskError, match="needs 'choices', a list of at least two"):
        task.rows("train")


# ------------------------------------------------------------------ shots, fitting, dev splits

def test_builtin_default_shots_are_the_papers(data_dir):
    from vllm_deepthink.tasks import default_shots

    expected = {"sst2": 4, "sst5": 2, "mr": 4, "agnews": 2, "trec": 2, "copa": 4,
                "openbookqa": 4, "qasc": 4, "hellaswag": 4, "winogrande": 4}
    assert {name: default_shots(load_task(data_dir / name)) for name in expected} == expected


def test_user_task_has_no_default_shots(tmp_path):
    from vllm_deepthink.tasks import default_shots

    assert default_shots(load_task(make_task_dir(tmp_path, CLS_SPEC, name="sst2"))) is None


def _length_task(tmp_path):
    # label 0 rows: lengths 1..20 words, label 1 rows: 1..20 words
    train = [{"text": " ".join(["w"] * (1 + i // 2)), "label": i % 2} for i in range(40)]
    return load_task(make_task_dir(tmp_path, CLS_SPEC, train=train)), train


def count_words(text):
    return len(text.split())


def test_fit_replaces_the_longest_demo_by_a_shorter_one_of_the_same_label(tmp_path):
    task, train = _length_task(tmp_path)
    free = sample_demos(task, 3, seed=1)
    budget = count_words(free.text) - 10
    fitted = sample_demos(task, 3, seed=1, max_tokens=budget, count_tokens=count_words)
    assert count_words(fitted.text) <= budget < count_words(free.text)
    fit = fitted.fit
    assert fit["tokens_first_draw"] == count_words(free.text) and fit["max_tokens"] == budget
    assert fit["tokens"] == count_words(fitted.text) and fit["replaced"]
    # per-class counts kept; each replacement is a shorter row of the same label
    assert Counter(train[i]["label"] for i in fitted.indices) == {0: 3, 1: 3}
    for old, new in fit["replaced"]:
        assert train[old]["label"] == train[new]["label"]
        assert len(train[new]["text"].split()) < len(train[old]["text"].split())
    # deterministic; the draws that fit are left alone
    assert sample_demos(task, 3, seed=1, max_tokens=budget,
                        count_tokens=count_words).indices == fitted.indices
    roomy = sample_demos(task, 3, seed=1, max_tokens=10_000, count_tokens=count_words)
    assert roomy.indices == free.indices and roomy.fit["replaced"] == []


def test_fit_that_cannot_succeed_says_so(tmp_path):
    task, _ = _length_task(tmp_path)
    with pytest.raises(TaskError, match="no shorter train row of the same label.*fewer shots"):
        sample_demos(task, 3, seed=0, max_tokens=3, count_tokens=count_words)


def test_dev_split_is_random_by_default_and_disjoint_from_demos(tmp_path):
    from vllm_deepthink.tasks import dev_indices

    train = [{"text": f"t{i}", "label": int(i % 10 == 0)} for i in range(200)]  # 10% label 1
    task = load_task(make_task_dir(tmp_path, CLS_SPEC, train=train))
    demos = sample_demos(task, 2, seed=0)
    idx = dev_indices(task, 100, seed=0, exclude=set(demos.indices))
    assert len(idx) == len(set(idx)) == 100 and not set(idx) & set(demos.indices)
    assert Counter(train[i]["label"] for i in idx)[1] < 25  # follows train, not 50/50
    strat = dev_indices(task, 20, seed=0, exclude=set(demos.indices), stratify=True)
    assert Counter(train[i]["label"] for i in strat) == {0: 10, 1: 10}
    assert dev_indices(task, 100, seed=0, exclude=set(demos.indices)) == idx
    assert dev_indices(task, 100, seed=1, exclude=set(demos.indices)) != idx


def test_dev_split_of_a_build_record(tmp_path):
    from vllm_deepthink.tasks import dev_split_of

    task = load_task(make_task_dir(tmp_path, CLS_SPEC))
    demos = sample_demos(task, 2, seed=5)
    record = {"dev_size": 8, "seed": 5, "demo_indices": demos.indices, "dev_stratified": True}
    assert dev_split_of(task, record) == dev_split(task, 8, 5, set(demos.indices),
                                                   stratify=True)
    with pytest.raises(TaskError, match="lacks"):
        dev_split_of(task, {"seed": 0})


def test_dev_split_from_a_held_out_split(tmp_path):
    """--dev-split validation: dev rows come from validation.jsonl (the demos' train
    indices do not apply there); the evaluation split is refused, a missing one named."""
    from vllm_deepthink.tasks import dev_split_of

    d = make_task_dir(tmp_path, CLS_SPEC)
    validation = [{"text": f"held out {i}", "label": i % 2} for i in range(12)]
    write_jsonl(d / "validation.jsonl", validation)
    task = load_task(d)
    assert task.eval_split == "test"
    demos = sample_demos(task, 2, seed=0)
    dev = dev_split(task, 8, seed=1, exclude=set(demos.indices), split="validation")
    assert len(dev) == 8 and all(row in validation for row in dev)
    # all 12 rows are available: the demos' train indices are not excluded from it
    assert len(dev_split(task, 100, seed=1, exclude=set(range(12)), split="validation")) == 12
    record = {"dev_size": 8, "seed": 1, "demo_indices": demos.indices,
              "dev_split": "validation"}
    assert dev_split_of(task, record) == dev
    with pytest.raises(TaskError, match="'test' is the split being evaluated.*'train' or "
                                        "'validation'"):
        dev_split(task, 8, seed=1, exclude=set(), split="test")
    with pytest.raises(TaskError, match="split being evaluated"):
        dev_split_of(task, {**record, "dev_split": "test"})
    # evaluating validation instead: test may hold the dev split, validation may not
    assert len(dev_split(task, 3, seed=1, exclude=set(), split="test",
                         evaluated="validation")) == 3
    with pytest.raises(TaskError, match="'validation' is the split being evaluated"):
        dev_split(task, 3, seed=1, exclude=set(), split="validation", evaluated="validation")
    bare = load_task(make_task_dir(tmp_path, CLS_SPEC, name="bare"))
    with pytest.raises(TaskError, match="has no 'validation' split.*from 'train'"):
        dev_split(bare, 8, seed=1, exclude=set(), split="validation")


def test_dev_split_leaves_out_rows_of_the_evaluated_split(tmp_path):
    """A held-out split sharing rows with the evaluated one: those rows are never drawn;
    the same data under two names is refused."""
    train = [{"text": f"text {i}", "label": i % 2} for i in range(20)]
    test = [{"text": f"test {i}", "label": i % 2} for i in range(6)]
    d = make_task_dir(tmp_path, CLS_SPEC, train=train, test=test)
    write_jsonl(d / "validation.jsonl", test[:4] + [{"text": "other", "label": 1}])
    task = load_task(d)
    assert dev_split(task, 10, seed=0, exclude=set(), split="validation") == [
        {"text": "other", "label": 1}]
    # the same item is the same item when a copy carries bookkeeping fields (an id, a
    # source) or spacing the prompt strips: what is compared is what the model sees
    copies = [{**row, "id": f"val-{i}"} for i, row in enumerate(test[:3])]
    copies.append({"text": f" {test[3]['text']}  ", "label": test[3]["label"]})
    write_jsonl(d / "validation.jsonl", copies + [{"text": "other", "label": 1, "id": "x"}])
    assert dev_split(load_task(d), 10, seed=0, exclude=set(), split="validation") == [
        {"text": "other", "label": 1, "id": "x"}]
    write_jsonl(d / "validation.jsonl", test)
    with pytest.raises(TaskError, match="no validation rows that are not also in the "
                                        "evaluated split 'test'.*same data"):
        dev_split(load_task(d), 10, seed=0, exclude=set(), split="validation")
