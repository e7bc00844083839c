"""Datasets: loss on assistant replies only; bad lines named by file and line."""
from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA
from pipeline.data import IGNORE, example_order, load_examples, read_jsonl, tokenize_record
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_phi3_dir))


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_only_replies_and_their_end_token_are_trained(tokenizer):
    rec = {"messages": [
        {"role": "system", "content": "丁寧に答えて。"},
        {"role": "user", "content": "富士山の高さは？"},
        {"role": "assistant", "content": "3776メートルです。"},
        {"role": "user", "content": "ありがとう"},
        {"role": "assistant", "content": "どういたしまして。"},
    ]}
    ex = tokenize_record(tokenizer, rec, 512, "x:1")
    text = trained_text(tokenizer, ex)
    assert "3776メートルです。" in text and "どういたしまして。" in text
    assert "富士山" not in text and "丁寧" not in text and "<|user|>" not in text
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    trained_ids = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert trained_ids.count(end) == 2  # each reply teaches the model to stop
    assert ex.input_ids[0] == tokenizer.bos_token_id


def test_text_records_train_every_token(tokenizer):
    ex = tokenize_record(tokenizer, {"text": "吾輩は猫である。"}, 512, "x:1")
    assert ex.labels == ex.input_ids


def test_truncation(tokenizer):
    ex = tokenize_record(tokenizer, {"text": "あいうえお" * 200}, 16, "x:1")
    assert len(ex.input_ids) == 16


def test_bundled_dataset_loads(tokenizer):
    examples = load_examples(DEMO_DATA, tokenizer, 256)
    assert len(examples) >= 30 and all(e.trained_tokens > 0 for e in examples)


@pytest.mark.parametrize("line,message", [
    ("{not json", "invalid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"text": ""}', '"text" must be a non-empty string'),
    ('{"text": "a", "messages": []}', 'exactly one of "messages" or "text"'),
    ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    ('["a list"]', 'exactly one of "messages" or "text"'),
])
def test_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "ok"})
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{message[:20]}"):
        read_jsonl(path)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_data_order_depends_only_on_the_step():
    a = [example_order(10, s, 3, seed=1) for s in range(8)]
    assert a == [example_order(10, s, 3, seed=1) for s in range(8)]
    first_epoch = sum(a[:3], []) + a[3][:1]
    assert sorted(first_epoch) == list(range(10))  # each epoch sees every example once
    assert a != [example_order(10, s, 3, seed=2) for s in range(8)]
