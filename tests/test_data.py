"""Datasets: sources and formats, the data policy, the split, over-long examples, packing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import DEMO_DATA, REPO, small_config, write_config
from pipeline.config import DataSource, load_config
from pipeline.data.dedup import Deduplicator
from pipeline.data.formats import to_record
from pipeline.data.pii import PII_CATEGORIES, apply_policy, luhn_ok, my_number_ok
from pipeline.data.prepare import in_validation, pii_detector_figures, prepare_data, read_prepared
from pipeline.data.sources import read_jsonl, read_source
from pipeline.data.tokenize import IGNORE, collate, example_order, load_examples, pack, tokenize_record
from pipeline.errors import DataError

CHAT = [{"role": "user", "content": "富士山の高さは？"}, {"role": "assistant", "content": "3776メートルです。"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_phi3_dir))


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


# -- tokenization ------------------------------------------------------------------

def test_only_replies_and_their_end_token_are_trained(tokenizer):
    """On Phi-3.5's real tokenizer the trained tokens are exactly each reply's tokens (its dummy-prefix
    piece and byte-fallback pieces included: 寧 has no piece of its own) and the <|end|> after it."""
    replies = ["3776メートルです。", "どういたしまして。丁寧にどうぞ 😀"]
    rec = {"messages": [
        {"role": "system", "content": "丁寧に答えて。"},
        {"role": "user", "content": "富士山の高さは？"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "ありがとう"},
        {"role": "assistant", "content": replies[1]},
    ]}
    ex = tokenize_record(tokenizer, rec, 512, "x:1")
    text = trained_text(tokenizer, ex)
    assert "3776メートルです。" in text and "どういたしまして。" in text
    assert "富士山" not in text and "丁寧に答えて" not in text and "<|user|>" not in text
    end, assistant = tokenizer.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    trained = [k for k, lab in enumerate(ex.labels) if lab != IGNORE]
    assert all(ex.labels[k] == ex.input_ids[k] for k in trained)
    # Each reply is one run of trained positions, right after its <|assistant|> marker, ending on <|end|>.
    starts = [k for k in trained if k - 1 not in trained]
    assert [ex.input_ids[k - 1] for k in starts] == [assistant, assistant]
    expected = []
    for reply in replies:
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids("<0xE5>") in reply_ids or "丁寧" not in reply
        expected += reply_ids + [end]
    assert [ex.input_ids[k] for k in trained] == expected  # each reply teaches the model to stop
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids.count(tokenizer.bos_token_id) == 1


def test_text_records_train_every_token_and_are_cut(tokenizer):
    ex = tokenize_record(tokenizer, {"text": "吾輩は猫である。"}, 512, "x:1")
    assert ex.labels == ex.input_ids
    assert len(tokenize_record(tokenizer, {"text": "あいうえお" * 200}, 16, "x:1").input_ids) == 16


def long_conversation() -> dict:
    return {"messages": [
        {"role": "system", "content": "短く答えて。"},
        {"role": "user", "content": "長い前置き" * 40}, {"role": "assistant", "content": "はい。" * 20},
        {"role": "user", "content": "本題です。"}, {"role": "assistant", "content": "答えです。"},
    ]}


def test_overlong_truncate_prompt_cuts_the_oldest_turns_and_keeps_the_reply(tokenizer):
    counts = Counter()
    full = tokenize_record(tokenizer, long_conversation(), 4096, "x:1")
    ex = tokenize_record(tokenizer, long_conversation(), 64, "x:1", "truncate_prompt", counts)
    assert len(full.input_ids) > 64 >= len(ex.input_ids)
    decoded = tokenizer.decode(ex.input_ids)
    assert "答えです。" in trained_text(tokenizer, ex) and "短く答えて。" in decoded and "前置き" not in decoded
    assert counts == {"truncated": 1}


def test_overlong_drop_and_a_reply_too_long_alone_are_counted_not_fatal(tokenizer):
    counts = Counter()
    assert tokenize_record(tokenizer, long_conversation(), 64, "x:1", "drop", counts) is None
    alone = {"messages": [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "長い答え" * 100}]}
    assert tokenize_record(tokenizer, alone, 64, "x:2", "truncate_prompt", counts) is None
    assert counts == {"dropped": 2}
    # the run goes on with the examples that fit
    assert len(load_examples([long_conversation(), {"messages": CHAT}], tokenizer, 64, "drop")) == 1


def test_bundled_dataset_tokenizes(tokenizer):
    examples = load_examples([r for _, r in read_jsonl(DEMO_DATA)], tokenizer, 256)
    assert len(examples) >= 30 and all(e.trained_tokens > 0 for e in examples)


def test_data_order_depends_only_on_the_step():
    a = [example_order(10, s, 3, seed=1) for s in range(8)]
    assert a == [example_order(10, s, 3, seed=1) for s in range(8)]
    first_epoch = sum(a[:3], []) + a[3][:1]
    assert sorted(first_epoch) == list(range(10))  # each epoch sees every example once
    assert a != [example_order(10, s, 3, seed=2) for s in range(8)]


# -- packing ---------------------------------------------------------------------

def test_packed_loss_equals_unpacked(tiny_phi3_dir, tokenizer):
    """Position ids restart and attention stays within each example: the same loss to 1e-5."""
    from pipeline.hf import load_causal_lm

    model = load_causal_lm(tiny_phi3_dir, nf4=False, compute_dtype=torch.float32, device=torch.device("cpu"))
    model.train()  # dropout is 0 in the tiny config; train mode as in training
    examples = load_examples([r for _, r in read_jsonl(DEMO_DATA)][:8], tokenizer, 256)
    windows = pack(examples, 256)
    assert len(windows) < len(examples) and all(len(w.input_ids) <= 256 for w in windows)
    assert sum(w.trained_tokens for w in windows) == sum(e.trained_tokens for e in examples)

    def loss(batch_examples):
        batch = collate(batch_examples, 0)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        with torch.no_grad():
            return model(**batch, num_items_in_batch=n).loss.item()

    unpacked, packed = loss(examples), loss(windows)
    assert abs(packed - unpacked) < 1e-5, (packed, unpacked)
    # Without restarting positions, tokens would attend across boundaries: the loss would differ.
    crossing = [type(w)(w.input_ids, w.labels, list(range(len(w.input_ids)))) for w in windows]
    assert abs(loss(crossing) - unpacked) > 1e-4


# -- sources and formats -------------------------------------------------------------

def src(**kw) -> DataSource:
    return DataSource(**kw)


def test_formats_give_the_same_conversation():
    sharegpt = {"conversations": [{"from": "human", "value": "富士山の高さは？"}, {"from": "gpt", "value": "3776メートルです。"}]}
    alpaca = {"instruction": "富士山の高さは？", "input": "", "output": "3776メートルです。"}
    assert to_record(sharegpt, src(path="x", format="sharegpt"), "x:1") == {"messages": CHAT}
    assert to_record(alpaca, src(path="x", format="alpaca"), "x:1") == {"messages": CHAT}
    for column in ("messages", "conversations", "conversation"):
        assert to_record({column: CHAT, "id": 1}, src(path="x", format="messages"), "x:1") == {"messages": CHAT}
    mapped = {"質問": "富士山の高さは？", "回答": "3776メートルです。"}
    assert to_record(mapped, src(path="x", format="alpaca", columns={"instruction": "質問", "output": "回答"}),
                     "x:1") == {"messages": CHAT}
    with_input = to_record({"instruction": "訳して", "input": "cat", "output": "猫", "system": "辞書"},
                           src(path="x", format="alpaca"), "x:1")["messages"]
    assert with_input[0] == {"role": "system", "content": "辞書"} and with_input[1]["content"] == "訳して\n\ncat"
    assert to_record({"body": "本文"}, src(path="x", format="text", columns={"text": "body"}), "x:1") == {"text": "本文"}


@pytest.mark.parametrize("fmt,row,message", [
    ("alpaca", {"prompt": "x", "completion": "y"}, "format alpaca expects \"instruction\" and \"output\""),
    ("sharegpt", {"messages": CHAT}, "format sharegpt expects a \"conversations\" list"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "is from 'bot'"),
    ("messages", {"prompt": "x"}, "format messages expects a chat column"),
    ("messages", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ("text", {"body": "x"}, "format text expects a \"text\" column"),
    ("auto", {"prompt": "x"}, 'exactly one of "messages" or "text"'),
])
def test_a_bad_row_names_the_row_the_format_and_the_keys_seen(fmt, row, message):
    with pytest.raises(DataError) as e:
        to_record(row, src(path="x", format=fmt), "f.jsonl:7")
    assert str(e.value).startswith("f.jsonl:7: ") and message in str(e.value)
    if "expects" in message:
        assert f"saw keys {sorted(row)}" in str(e.value)


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert read_jsonl(path) == [(1, {"text": "a"}), (3, {"text": "b"})]


def test_bad_json_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        read_jsonl(path)


def write_sources(root: Path) -> dict[str, Path]:
    """One file per format and container, each holding one conversation (CHAT)."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    files = {
        "sharegpt": root / "sharegpt.jsonl", "alpaca": root / "alpaca.json", "parquet": root / "chat.parquet",
        "csv": root / "alpaca.csv", "bom": root / "bom.jsonl",
    }
    files["sharegpt"].write_text(json.dumps({"conversations": [
        {"from": "system", "value": "丁寧に。"}, {"from": "human", "value": "東京の人口は？"},
        {"from": "gpt", "value": "約1400万人です。"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    files["alpaca"].write_text(json.dumps([{"instruction": "日本の首都は？", "input": "", "output": "東京です。"}],
                                          ensure_ascii=False), encoding="utf-8")
    pd.DataFrame({"conversation": [[{"role": "user", "content": "琵琶湖はどこ？"},
                                    {"role": "assistant", "content": "滋賀県です。"}]]}).to_parquet(files["parquet"])
    files["csv"].write_bytes("\ufeff質問,回答\r\n北海道の道庁所在地は？,札幌市です。\r\n".encode())
    files["bom"].write_bytes("\ufeff".encode() + json.dumps({"messages": [
        {"role": "user", "content": "一番高い山は？"}, {"role": "assistant", "content": "富士山です。"}]},
        ensure_ascii=False).encode() + b"\r\n")
    return files


def source_list(files: dict[str, Path]) -> list[dict]:
    return [
        {"path": str(files["sharegpt"]), "format": "sharegpt"},
        {"path": str(files["alpaca"]), "format": "alpaca"},
        {"path": str(files["parquet"]), "format": "messages", "column": "conversation"},
        {"path": str(files["csv"]), "format": "alpaca", "columns": {"instruction": "質問", "output": "回答"}},
        {"path": str(files["bom"]), "format": "messages"},
    ]


def test_every_container_reads_into_records(tmp_path):
    files = write_sources(tmp_path)
    got = []
    for s in source_list(files):
        name, rows = read_source(DataSource(**s), Path)
        got += [to_record(r.record, DataSource(**s), r.where)["messages"][-1]["content"] for r in rows]
        assert rows[0].where.startswith(s["path"])
    assert got == ["約1400万人です。", "東京です。", "滋賀県です。", "札幌市です。", "富士山です。"]


def test_max_examples(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)), encoding="utf-8")
    assert len(read_source(DataSource(path=str(path), max_examples=3), Path)[1]) == 3


def hub_files() -> dict[str, bytes]:
    """A dataset repository's files as the hub holds them: a README whose configs name Parquet shards
    (config default with splits train and test, config short with train only)."""
    import io

    import pandas as pd

    def parquet(rows: list[tuple[str, str]]) -> bytes:
        buf = io.BytesIO()
        pd.DataFrame({"conversations": [[{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                                        for q, a in rows]}).to_parquet(buf)
        return buf.getvalue()

    readme = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
              "  - split: test\n    path: data/test-*.parquet\n- config_name: short\n  data_files:\n"
              "  - split: train\n    path: short/train-*.parquet\n---\n# a tiny dataset\n")
    return {"README.md": readme.encode(),
            "data/train-00000-of-00001.parquet": parquet([(f"質問{i}", f"答え{i}") for i in range(3)]),
            "data/test-00000-of-00001.parquet": parquet([("試験", "合格")]),
            "short/train-00000-of-00001.parquet": parquet([("短い", "はい")])}


def hub_repo(folder: Path) -> Path:
    """The repository checked out in a folder (a local path given as `hub:`)."""
    for name, data in hub_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def hub_cache(cache: Path, repo_id: str, revision: str, branch: str = "main") -> None:
    """The repository at `revision` in a hub cache, laid out as huggingface_hub writes it:
    datasets--owner--name/{blobs/<sha256>, snapshots/<revision>/<path> -> blob, refs/<branch>}."""
    import hashlib

    entry = cache / ("datasets--" + repo_id.replace("/", "--"))
    (entry / "blobs").mkdir(parents=True)
    for name, data in hub_files().items():
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = entry / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", blob.name))
    (entry / "refs").mkdir()
    (entry / "refs" / branch).write_text(revision, encoding="utf-8")


def test_hub_dataset_from_a_local_repository_folder(tmp_path):
    repo = hub_repo(tmp_path / "repo")
    s = DataSource(hub=str(repo), format="sharegpt", split="train")
    name, rows = read_source(s, Path)
    assert [to_record(r.record, s, r.where)["messages"][1]["content"] for r in rows] == ["答え0", "答え1", "答え2"]
    with pytest.raises(DataError, match=r"repo\[validation\]: cannot be read"):
        read_source(DataSource(hub=str(repo), split="validation"), Path)


def test_hub_dataset_ids_from_the_hub_cache_offline(tmp_path, tiny_phi3_dir):
    """`make data` on owner/name ids, through snapshot_download and datasets, with HF_HUB_OFFLINE=1 and a
    hub cache laid out as the hub client writes it: a branch resolved through refs/, a pinned commit,
    a split and a subset; a revision the cache lacks is a clear error naming the dataset, and no traceback."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path / "hub", "acme/chat-ja", revision)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_TOKEN": "hf_unused_offline"}
    sources = [{"hub": "acme/chat-ja", "revision": "main", "format": "sharegpt"},
               {"hub": "acme/chat-ja", "revision": revision, "split": "test", "format": "sharegpt"},
               {"hub": "acme/chat-ja", "revision": revision, "subset": "short", "format": "sharegpt"}]

    def data_stage(name: str, train: list[dict]) -> tuple[subprocess.CompletedProcess, Path]:
        config = write_config(tmp_path / f"{name}.yaml", small_config(
            tiny_phi3_dir, tmp_path / name, data={"train": train, "validation_fraction": 0}))
        proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "--config", str(config)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        return proc, load_config(config).data_report

    proc, report = data_stage("ok", sources)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(report.read_text(encoding="utf-8"))["read"] == {
        "acme/chat-ja[train]": 3, "acme/chat-ja[test]": 1, "acme/chat-ja:short[train]": 1}
    proc, report = data_stage("missing", [{"hub": "acme/chat-ja", "revision": "v2", "format": "sharegpt"}])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "acme/chat-ja@v2: cannot fetch the dataset from the hub" in proc.stderr
    assert not report.exists()


# -- the data policy ---------------------------------------------------------------

def test_pii_detectors_on_the_corpus():
    """Every category has Japanese and English positives and look-alikes (full-width forms among them).
    Every positive is found. The look-alikes the issue names are never flagged: card numbers failing
    Luhn, 12 digits failing the My Number check digit, dates and times shaped like phone numbers.
    Elsewhere a look-alike may be truly ambiguous (section 3.2.1.4 is a valid IPv4 address): at most one."""
    corpus = [rec for _, rec in read_jsonl(Path(__file__).parent.parent / "data" / "pii_corpus.jsonl")]
    for c in PII_CATEGORIES:
        langs = {(r["lang"], r["pii"]) for r in corpus if r["category"] == c}
        assert {("ja", True), ("en", True), ("ja", False), ("en", False)} <= langs, c
        assert sum(r["category"] == c and r["pii"] for r in corpus) >= 5, c
    figures = pii_detector_figures()
    for c, f in figures.items():
        assert f["recall"] == 1.0 and f["false_positives"] <= 1, (c, f)
    for c in ("credit_card", "my_number", "phone"):
        assert figures[c]["false_positives"] == 0 and figures[c]["negatives"] >= 5, (c, figures[c])


def test_full_width_forms_are_found_and_masked_in_place():
    out, found = apply_policy({"text": "電話は０３－１２３４－５６７８、メールはｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐです。"},
                              dict.fromkeys(PII_CATEGORIES, "mask"))
    assert out == {"text": "電話は[PHONE]、メールは[EMAIL]です。"} and found == {"phone": 1, "email": 1}
    assert apply_policy({"text": "締め切りは２０２４－０３－１５"}, dict.fromkeys(PII_CATEGORIES, "drop"))[1] == {}


def test_check_digits():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert my_number_ok("123456789018") and not my_number_ok("123456789019")


def test_pii_policy_mask_drop_keep():
    rec = {"messages": [{"role": "user", "content": "連絡先は taro@example.jp、電話は03-1234-5678です。"},
                        {"role": "assistant", "content": "承知しました。"}]}
    policy = dict.fromkeys(PII_CATEGORIES, "mask")
    out, found = apply_policy(rec, policy)
    assert out["messages"][0]["content"] == "連絡先は [EMAIL]、電話は[PHONE]です。"
    assert found == {"email": 1, "phone": 1}
    out, _ = apply_policy(rec, {**policy, "phone": "keep"})
    assert out["messages"][0]["content"] == "連絡先は [EMAIL]、電話は03-1234-5678です。"
    assert apply_policy(rec, {**policy, "email": "drop"})[0] is None
    clean = {"text": "何もない文です。2024-03-15"}
    assert apply_policy(clean, {**policy, "phone": "drop"}) == (clean, {})


def test_exact_and_near_duplicates():
    d = Deduplicator(exact=True, near=True, threshold=0.85)
    base = {"messages": [{"role": "user", "content": "日本で一番高い山について詳しく教えてください。" * 3},
                         {"role": "assistant", "content": "富士山です。標高は3776メートルで、静岡県と山梨県にまたがります。" * 3}]}
    spaced = {"messages": [dict(m, content=m["content"].replace("。", "。 ")) for m in base["messages"]]}
    near = {"messages": [base["messages"][0], dict(base["messages"][1], content=base["messages"][1]["content"]
                                                   .replace("3776", "3,776", 1))]}
    other = {"messages": [{"role": "user", "content": "琵琶湖はどこ？"}, {"role": "assistant", "content": "滋賀県です。"}]}
    assert [d.seen(r) for r in (base, spaced, near, other)] == [None, "exact", "near", None]


def test_the_split_is_stable_when_lines_are_appended():
    recs = [{"text": f"例文その{i}"} for i in range(400)]
    before = [in_validation(r, 42, 0.1) for r in recs]
    assert 20 < sum(before) < 60
    after = [in_validation(r, 42, 0.1) for r in recs + [{"text": f"追加{i}"} for i in range(100)]]
    assert after[:400] == before
    assert before != [in_validation(r, 7, 0.1) for r in recs]  # seeded


# -- the stage ------------------------------------------------------------------------

def test_prepare_writes_splits_report_and_provenance(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"質問{i}です。"}, {"role": "assistant", "content": f"答え{i}です。"}]}
             for i in range(30)]
    lines[3]["messages"][0]["content"] = "カードは4111 1111 1111 1111です。"
    lines[4]["messages"][1]["content"] = "メールは a@example.com へ。"
    lines.append(lines[0])
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "build", data={"train": str(data), "validation_fraction": 0.2,
                                                 "dedup": {"near": False}})))
    prepare_data(cfg)
    report = json.loads(cfg.data_report.read_text(encoding="utf-8"))
    assert report["pii"]["credit_card"] == {"policy": "drop", "found": 1, "examples": 1}
    assert report["pii"]["email"]["found"] == 1 and report["pii_dropped_examples"] == 1
    assert report["duplicates"] == {"exact": 1, "near": 0}
    assert report["kept"]["train"] + report["kept"]["validation"] == 29 and report["kept"]["validation"] > 0
    md = (cfg.reports_dir / "data.md").read_text(encoding="utf-8")
    phone = report["pii_detectors"]["phone"]
    assert phone["positives"] >= 7 and phone["found"] == phone["positives"]
    assert f"| phone | mask | 0 | 0 | {phone['found']}/{phone['positives']} | 0/{phone['negatives']} |" in md
    splits, sha = read_prepared(cfg)
    kept = splits["train"] + splits["validation"]
    assert all(r["source"].startswith(f"{data}:") for r in kept)
    assert any("[EMAIL]" in r["messages"][1]["content"] for r in kept)
    assert not any("4111" in json.dumps(r) for r in kept)


def test_prepare_refuses_when_nothing_is_left(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "電話は03-1234-5678"}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(
        tiny_phi3_dir, tmp_path / "build", data={"train": str(data), "pii": {"phone": "drop"}})))
    with pytest.raises(DataError, match="no training example left .* 1 dropped for personal information"):
        prepare_data(cfg)
    assert not cfg.prepared_dir.exists() and not cfg.data_report.exists()
