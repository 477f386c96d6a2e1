"""Prompt dataset loading and the rollout data source (plugrl.core.data); CPU, fast."""

from __future__ import annotations

import json
import random

import pytest

from plugrl.core.data import (
    DataError,
    PromptDataSource,
    PromptDataset,
    load_eval_datasets,
    load_prompt_dataset,
    parse_spec,
)
from plugrl.core.types import Sample

# A tiny chat template; the rendered strings below are asserted exactly.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | map(attribute='name') | join(',') }}<|end|>\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)


def write_jsonl(path, rows):
    """rows: dicts are JSON-encoded, strings are written verbatim (for malformed lines)."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def tokenizer(tmp_path):
    """A word-level tokenizer built locally (no hub), saved and reloaded as a real HF tokenizer would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "a", "b", "c", "d", "e", "what", "is", "1+1"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture
def ten_rows(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"input": f"p{i}", "label": str(i)} for i in range(10)])


def prompts(ds):
    return [s.prompt for s in ds.samples]


# ---- plain loading --------------------------------------------------------------------------------


def test_jsonl_basic_fields_and_blank_lines(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"input": "hi", "label": "1", "metadata": {"k": 1}},
            "",
            "   ",
            {"input": [{"role": "user", "content": "yo"}], "label": 2, "tools": '[{"name": "calc"}]'},
        ],
    )
    ds = load_prompt_dataset(str(p), label_key="label")
    assert isinstance(ds, PromptDataset) and len(ds) == 2 and ds.path == str(p)
    a, b = ds.samples
    assert (a.prompt, a.label, a.metadata) == ("hi", "1", {"k": 1})
    # without --apply-chat-template a list-of-messages prompt stays a list; tools land in metadata
    assert b.prompt == [{"role": "user", "content": "yo"}]
    assert b.metadata == {"tools": [{"name": "calc"}]}
    assert ds.skipped == {} and ds.dropped_too_long == 0


def test_label_is_none_without_label_key(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    assert all(s.label is None for s in ds.samples)


def test_custom_keys(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "meta": {"x": 1}}])
    (s,) = load_prompt_dataset(str(p), input_key="question", label_key="answer", metadata_key="meta").samples
    assert (s.prompt, s.label, s.metadata) == ("q", "a", {"x": 1})


# ---- bad rows -------------------------------------------------------------------------------------

BAD_ROWS = [
    # (bad line, reason, words the message must contain)
    ('{"input": "x", ', "invalid_json", ["invalid JSON"]),
    ('["input", "x"]', "not_an_object", ["expected a JSON object", "list"]),
    ('{"question": "x", "label": "1"}', "missing_input_key", ["'input'", "--input-key", "'question'"]),
    ('{"input": "x"}', "missing_label_key", ["'label'", "--label-key"]),
    ('{"input": 5, "label": "1"}', "bad_prompt_type", ["'input'", "int"]),
    ('{"input": [{"text": "x"}], "label": "1"}', "bad_prompt_type", ["'input'", "list"]),
    ('{"input": "x", "label": "1", "metadata": "{\\"a\\": 1}"}', "bad_metadata_type", ["'metadata'", "str"]),
    ('{"input": "x", "label": "1", "metadata": [1]}', "bad_metadata_type", ["'metadata'", "list"]),
]


@pytest.mark.parametrize("bad_line,reason,words", BAD_ROWS, ids=[f"{r[1]}-{i}" for i, r in enumerate(BAD_ROWS)])
def test_bad_row_names_file_and_line(tmp_path, bad_line, reason, words):
    good = {"input": "ok", "label": "1"}
    # a blank line before the bad one: line numbers are physical lines of the file
    p = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(DataError) as ei:
        load_prompt_dataset(str(p), label_key="label")
    msg = str(ei.value)
    assert str(p) in msg and "line 3" in msg, msg
    assert "--skip-bad-rows" in msg
    for w in words:
        assert w in msg, (w, msg)
    assert ei.value.line == 3 and ei.value.reason == reason and ei.value.path == str(p)
    assert isinstance(ei.value, ValueError)


def test_skip_bad_rows_counts_per_reason(tmp_path):
    good = {"input": "ok", "label": "1"}
    p = write_jsonl(
        tmp_path / "bad.jsonl",
        [good] + [line for line, _, _ in BAD_ROWS] + [good],
    )
    ds = load_prompt_dataset(str(p), label_key="label", skip_bad_rows=True)
    assert len(ds) == 2
    assert ds.skipped == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_input_key": 1,
        "missing_label_key": 1,
        "bad_prompt_type": 2,
        "bad_metadata_type": 2,
    }


def test_bad_tools(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "tools": "not json"}])
    with pytest.raises(DataError, match=r"line 1: 'tools'"):
        load_prompt_dataset(str(p))
    p = write_jsonl(tmp_path / "e.jsonl", [{"input": "x", "tools": {"name": "calc"}}])
    with pytest.raises(DataError, match="must be a list"):
        load_prompt_dataset(str(p))


def test_empty_after_filtering_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ["{broken", '{"q": 1}'])
    with pytest.raises(DataError, match=r"no prompts left") as ei:
        load_prompt_dataset(str(p), skip_bad_rows=True)
    assert str(p) in str(ei.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no prompts left"):
        load_prompt_dataset(str(empty))


def test_bad_rows_outside_the_slice_are_not_read(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "a"}, {"input": "b"}, "{broken"])
    assert prompts(load_prompt_dataset(f"{p}@[:2]")) == ["a", "b"]
    # and a bad row inside a slice is reported with its line in the file
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: invalid JSON"):
        load_prompt_dataset(f"{p}@[-1:]")


# ---- file formats and paths -----------------------------------------------------------------------


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"input": "x"}]')
    with pytest.raises(DataError) as ei:
        load_prompt_dataset(str(p))
    msg = str(ei.value)
    assert str(p) in msg and ".jsonl" in msg and ".parquet" in msg and "save_to_disk" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    "suffix,expected",
    [
        ("@[1:3]", ["p1", "p2"]),
        ("@[:2]", ["p0", "p1"]),
        ("@[-2:]", ["p8", "p9"]),
        ("@[7:]", ["p7", "p8", "p9"]),
        ("@[-4:-2]", ["p6", "p7"]),
        ("@[2:-6]", ["p2", "p3"]),
        ("", [f"p{i}" for i in range(10)]),
    ],
)
def test_slices(ten_rows, suffix, expected):
    assert prompts(load_prompt_dataset(f"{ten_rows}{suffix}")) == expected


def test_parse_spec():
    assert parse_spec("a/b.jsonl") == ("a/b.jsonl", None, None)
    assert parse_spec("a/b.jsonl@[1:3]") == ("a/b.jsonl", 1, 3)
    assert parse_spec("a/b.jsonl@[-2:]") == ("a/b.jsonl", -2, None)
    assert parse_spec("a/b.jsonl@[:]") == ("a/b.jsonl", None, None)
    with pytest.raises(DataError, match="not an integer"):
        parse_spec("a.jsonl@[x:2]")
    with pytest.raises(DataError, match=r"path@\[start:end\]"):
        parse_spec("a.jsonl@[1]")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "input": [f"p{i}" for i in range(5)],
            "label": [str(i) for i in range(5)],
            "metadata": [{"k": i} for i in range(5)],
        }
    )
    p = tmp_path / "d.parquet"
    pq.write_table(table, p, row_group_size=2)  # several row groups: streaming crosses batches
    ds = load_prompt_dataset(str(p), label_key="label")
    assert prompts(ds) == [f"p{i}" for i in range(5)]
    assert ds.samples[3].label == "3" and ds.samples[3].metadata == {"k": 3}
    assert prompts(load_prompt_dataset(f"{p}@[1:3]")) == ["p1", "p2"]
    assert prompts(load_prompt_dataset(f"{p}@[-2:]")) == ["p3", "p4"]
    # parquet errors name the row
    with pytest.raises(DataError) as ei:
        load_prompt_dataset(str(p), label_key="answer")
    assert str(p) in str(ei.value) and "row 1" in str(ei.value) and "--label-key" in str(ei.value)


def test_parquet_bad_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input": ["a", None, "c"]}), p)
    with pytest.raises(DataError, match=r"row 2: 'input' must be a string"):
        load_prompt_dataset(str(p))
    assert load_prompt_dataset(str(p), skip_bad_rows=True).skipped == {"bad_prompt_type": 1}


def test_saved_hf_dataset(tmp_path):
    import datasets

    rows = {"input": [f"p{i}" for i in range(4)], "label": ["0", "1", "2", "3"]}
    single = tmp_path / "single"
    datasets.Dataset.from_dict(rows).save_to_disk(str(single))
    ds = load_prompt_dataset(str(single), label_key="label")
    assert prompts(ds) == ["p0", "p1", "p2", "p3"] and ds.samples[2].label == "2"
    assert prompts(load_prompt_dataset(f"{single}@[-2:]")) == ["p2", "p3"]

    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(only_train))
    assert len(load_prompt_dataset(str(only_train))) == 4

    two = tmp_path / "two"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict({"input": ["t0", "t1"]})}
    ).save_to_disk(str(two))
    with pytest.raises(DataError, match=r"splits \['train', 'test'\].*:SPLIT"):
        load_prompt_dataset(str(two))
    assert prompts(load_prompt_dataset(f"{two}:test")) == ["t0", "t1"]
    assert prompts(load_prompt_dataset(f"{two}:train@[1:2]")) == ["p1"]
    with pytest.raises(DataError, match="no split 'dev'"):
        load_prompt_dataset(f"{two}:dev")
    # inside a slice, errors name the row of the split, not of the slice
    with pytest.raises(DataError, match="train, row 3: no key 'question'"):
        load_prompt_dataset(f"{two}:train@[2:]", input_key="question")


# ---- chat template and prompt length --------------------------------------------------------------


def test_chat_template_string_prompt(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "what is 1+1", "label": "2"}])
    (s,) = load_prompt_dataset(str(p), label_key="label", apply_chat_template=True, tokenizer=tokenizer).samples
    assert s.prompt == "<|user|>what is 1+1<|end|>\n<|assistant|>"
    assert s.label == "2"


def test_chat_template_messages_tools_and_kwargs(tmp_path, tokenizer):
    row = {
        "input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"}],
        "tools": [{"name": "calc"}, {"name": "search"}],
    }
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    (s,) = load_prompt_dataset(
        str(p),
        apply_chat_template=True,
        tokenizer=tokenizer,
        apply_chat_template_kwargs={"enable_thinking": False},
    ).samples
    assert s.prompt == (
        "<|system|>be brief<|end|>\n<|user|>a b<|end|>\n<|tools|>calc,search<|end|>\n<|assistant|><think></think>"
    )
    assert s.metadata == {"tools": [{"name": "calc"}, {"name": "search"}]}


def test_chat_template_needs_tokenizer(ten_rows):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompt_dataset(str(ten_rows), apply_chat_template=True)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompt_dataset(str(ten_rows), max_prompt_len=3)


def test_max_prompt_len_drops_long_prompts_in_order(tmp_path, tokenizer):
    rows = [{"input": t} for t in ["a b c", "a", "a b c d e", "b c", "e e e e"]]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_prompt_dataset(str(p), tokenizer=tokenizer, max_prompt_len=3)
    assert prompts(ds) == ["a b c", "a", "b c"]
    assert ds.dropped_too_long == 2
    with pytest.raises(DataError, match="no prompts left.*--rollout-max-prompt-len"):
        load_prompt_dataset(str(p), tokenizer=tokenizer, max_prompt_len=0)


def test_max_prompt_len_counts_the_rendered_template(tmp_path, tokenizer):
    # "<|user|>a<|end|>\n<|assistant|>" splits on whitespace into 2 tokens
    p = write_jsonl(tmp_path / "d.jsonl", [{"input": "a"}, {"input": "a b c"}])
    ds = load_prompt_dataset(str(p), apply_chat_template=True, tokenizer=tokenizer, max_prompt_len=2)
    assert prompts(ds) == ["<|user|>a<|end|>\n<|assistant|>"] and ds.dropped_too_long == 1


# ---- shuffle --------------------------------------------------------------------------------------


def test_shuffle_matches_slime_and_is_deterministic(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    file_order = prompts(ds)
    ds.shuffle(epoch=1, seed=42)
    first = prompts(ds)
    # slime: random.seed(rollout_seed + epoch); random.shuffle(permutation over the original order)
    perm = list(range(10))
    random.Random(43).shuffle(perm)
    assert first == [file_order[i] for i in perm]
    ds.shuffle(epoch=2, seed=42)
    assert prompts(ds) != first and sorted(prompts(ds)) == sorted(file_order)
    ds.shuffle(epoch=1, seed=42)  # from the original order, not from the previous shuffle
    assert prompts(ds) == first
    ds2 = load_prompt_dataset(str(ten_rows))
    ds2.shuffle(epoch=1, seed=42)
    assert prompts(ds2) == first
    assert ds.original_samples[0].prompt == "p0"


def test_shuffle_leaves_global_random_alone(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    random.seed(123)
    expected = random.random()
    random.seed(123)
    ds.shuffle(epoch=0, seed=7)
    assert random.random() == expected


# ---- data source ----------------------------------------------------------------------------------


def test_groups_are_numbered_deep_copies(ten_rows):
    ds = load_prompt_dataset(str(ten_rows), label_key="label")
    src = PromptDataSource(ds, n_samples_per_prompt=3)
    groups = src.next_groups(2) + src.next_groups(1)
    assert [[s.prompt for s in g] for g in groups] == [["p0"] * 3, ["p1"] * 3, ["p2"] * 3]
    assert [[s.group_index for s in g] for g in groups] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert [s.index for g in groups for s in g] == list(range(9))
    assert all(s.rollout_id is None for g in groups for s in g)
    # mutating one sample touches neither its siblings nor the dataset
    groups[0][0].metadata["seen"] = True
    groups[0][0].response = "x"
    assert groups[0][1].metadata == {} and groups[0][1].response == ""
    assert ds.original_samples[0].metadata == {}
    assert src.next_groups(0) == []


def test_epoch_wrap_without_shuffle(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    src = PromptDataSource(ds, n_samples_per_prompt=1)
    first = src.next_groups(8)
    assert (src.epoch, src.offset) == (0, 8)
    wrapped = src.next_groups(4)
    assert [g[0].prompt for g in wrapped] == ["p8", "p9", "p0", "p1"]
    assert (src.epoch, src.offset) == (1, 2)
    assert [g[0].group_index for g in first + wrapped] == list(range(12))
    # ending exactly at the end of an epoch wraps lazily on the next call
    src.next_groups(8)
    assert (src.epoch, src.offset) == (1, 10)
    assert [g[0].prompt for g in src.next_groups(1)] == ["p0"] and (src.epoch, src.offset) == (2, 1)
    # a request larger than the dataset spans several epochs
    big = src.next_groups(25)
    assert len(big) == 25 and (src.epoch, src.offset) == (4, 6)


def test_epoch_wrap_with_shuffle(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    src = PromptDataSource(ds, n_samples_per_prompt=2, shuffle=True, seed=5)
    e0 = [g[0].prompt for g in src.next_groups(10)]
    e1 = [g[0].prompt for g in src.next_groups(10)]
    assert e0 == [ds.original_samples[i].prompt for i in ds.permutation(0, 5)]
    assert e1 == [ds.original_samples[i].prompt for i in ds.permutation(1, 5)]
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(prompts(ds))
    assert src.epoch == 1


def test_state_dict_resume_matches_uninterrupted(ten_rows):
    ds = load_prompt_dataset(str(ten_rows))
    batches = [4, 4, 4, 4, 4, 4, 7]  # crosses epoch boundaries mid-batch and at a batch end

    def run(src, sizes):
        return [[(s.prompt, s.group_index, s.index) for s in g] for k in sizes for g in src.next_groups(k)]

    straight = run(PromptDataSource(ds, 2, shuffle=True, seed=11), batches)

    src = PromptDataSource(ds, 2, shuffle=True, seed=11)
    head = run(src, batches[:2])  # stop at epoch 0, offset 8
    state = json.loads(json.dumps(src.state_dict()))  # must survive JSON
    assert state["epoch"] == 0 and state["offset"] == 8 and state["group_index"] == 8 and state["sample_index"] == 16
    resumed = PromptDataSource(ds, 2, shuffle=False, seed=0)  # saved seed/shuffle win
    resumed.load_state_dict(state)
    mid = run(resumed, batches[2:4])  # crosses into epoch 1
    assert resumed.epoch == 1
    state2 = json.loads(json.dumps(resumed.state_dict()))
    resumed2 = PromptDataSource(ds, 2, shuffle=True, seed=11)
    resumed2.load_state_dict(state2)  # resumes in epoch 1: must reshuffle to epoch 1, not 0
    tail = run(resumed2, batches[4:])
    assert head + mid + tail == straight


def test_load_state_dict_rejects_offset_beyond_dataset(ten_rows):
    src = PromptDataSource(load_prompt_dataset(str(ten_rows)), 1)
    state = src.state_dict() | {"offset": 11}
    with pytest.raises(ValueError, match="beyond the dataset"):
        src.load_state_dict(state)


def test_num_rollout_per_epoch(ten_rows):
    src = PromptDataSource(load_prompt_dataset(str(ten_rows)), 4)
    assert src.num_rollout_per_epoch(3) == 3
    assert src.num_rollout_per_epoch(10) == 1
    with pytest.raises(ValueError, match=r"--rollout-batch-size 11.*\(10 prompts\)"):
        src.num_rollout_per_epoch(11)


def test_no_dataset_yields_empty_samples():
    src = PromptDataSource(None, n_samples_per_prompt=2)
    groups = src.next_groups(2)
    assert [[(s.prompt, s.group_index, s.index) for s in g] for g in groups] == [
        [("", 0, 0), ("", 0, 1)],
        [("", 1, 2), ("", 1, 3)],
    ]
    assert all(isinstance(s, Sample) for g in groups for s in g)


# ---- eval datasets --------------------------------------------------------------------------------


def test_eval_datasets(tmp_path, ten_rows):
    other = write_jsonl(tmp_path / "o.jsonl", [{"input": "q", "label": "a"}])
    out = load_eval_datasets(["math", f"{ten_rows}@[:3]", "other", str(other)], label_key="label")
    assert list(out) == ["math", "other"]
    assert len(out["math"]) == 3 and out["other"].samples[0].label == "a"
    assert list(load_eval_datasets([str(other)])) == ["aime"]
    assert load_eval_datasets([]) == {} and load_eval_datasets(None) == {}
    with pytest.raises(ValueError, match="--eval-prompt-data"):
        load_eval_datasets(["a", str(other), "b"])
    with pytest.raises(ValueError, match="twice"):
        load_eval_datasets(["a", str(other), "a", str(other)])
