"""Credentials in training data (pipeline/data/credentials.py, data.secrets): found by format,
placeholders left alone, dropped by default, masked or kept when asked, and counted in the report."""
from __future__ import annotations

import json

import pytest

from conftest import small_config, write_config
from pipeline.config import ConfigError, load_config
from pipeline.data.credentials import SECRET_KINDS, apply_secrets_policy, find_secrets
from pipeline.data.prepare import SECRETS_CORPUS, prepare_data, read_prepared, secrets_detector_figures
from pipeline.data.sources import read_jsonl
from pipeline.errors import DataError

GITHUB = "ghp_" + "R4nd0mT0k3nV4lu3F0rCh3ck1ngAbCdEf123"
AWS = "AKIA" + "Z3MPLQW5RT7YU2KD"


def test_the_corpus_has_every_kind_and_each_is_found_without_false_positives():
    figures = secrets_detector_figures()
    for kind in SECRET_KINDS:
        f = figures[kind]
        assert f["positives"] >= 2 and f["found"] == f["positives"], (kind, f)
        assert f["false_positives"] == 0, (kind, f)
    assert sum(f["negatives"] for f in figures.values()) >= 20


def test_the_corpus_is_japanese_and_english():
    texts = [rec["text"] for _, rec in read_jsonl(SECRETS_CORPUS)]
    assert any(any("\u3040" <= c <= "\u30ff" for c in t) for t in texts)
    assert any(t.isascii() for t in texts)


@pytest.mark.parametrize("text,kind,secret", [
    (f"トークンは {GITHUB} です", "github_token", GITHUB),
    (f"id={AWS}", "aws_key", AWS),
    ("パスワード：Passw0rd2024 でログイン", "assignment", "Passw0rd2024"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n以上",
     "private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"),
])
def test_a_find_is_the_secret_itself(text, kind, secret):
    [find] = find_secrets(text)
    assert (find.kind, text[find.start:find.end]) == (kind, secret)


@pytest.mark.parametrize("text", [
    "AKIAXXXXXXXXXXXXXXXX", "AKIAIOSFODNN7EXAMPLE", "password: ********", "token = get_token()",
    "api_key: <your api key>", "GITHUB_TOKEN=${GITHUB_TOKEN}", "パスワードを入力してください",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "123e4567-e89b-12d3-a456-426614174000",
])
def test_placeholders_and_look_alikes_are_left_alone(text):
    assert find_secrets(text) == []


def test_the_policy_drops_masks_or_keeps():
    rec = {"messages": [{"role": "user", "content": f"これを使って {GITHUB}"},
                        {"role": "assistant", "content": f"了解です。{AWS} も受け取りました。"}]}
    assert apply_secrets_policy(rec, "drop") == (None, {"github_token": 1, "aws_key": 1})
    masked, found = apply_secrets_policy(rec, "mask")
    assert [m["content"] for m in masked["messages"]] == ["これを使って [GITHUB_TOKEN]",
                                                          "了解です。[AWS_KEY] も受け取りました。"]
    assert apply_secrets_policy(rec, "keep") == (rec, found)
    clean = {"text": "富士山は3776メートルです。"}
    assert apply_secrets_policy(clean, "drop") == (clean, {})


def write_data(path, extra: list[dict]) -> None:
    lines = [{"messages": [{"role": "user", "content": f"質問{i}です。"}, {"role": "assistant", "content": f"答え{i}です。"}]}
             for i in range(12)] + extra
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


@pytest.mark.reliability("bad-input")
def test_the_data_stage_drops_credentials_by_default_and_reports_them(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    write_data(data, [{"messages": [{"role": "user", "content": f"キー {GITHUB} を覚えて"},
                                    {"role": "assistant", "content": "わかりました。"}]},
                      {"messages": [{"role": "user", "content": "設定は？"},
                                    {"role": "assistant", "content": "password=hunter2x を使います"}]}])
    settings = small_config(tiny_phi3_dir, tmp_path / "build", data={"train": str(data), "validation_fraction": 0.0})
    cfg = load_config(write_config(tmp_path / "c.yaml", settings))
    assert cfg.data.secrets == "drop"
    prepare_data(cfg)
    report = json.loads(cfg.data_report.read_text(encoding="utf-8"))
    assert report["secrets"]["dropped_examples"] == 2 and report["kept"]["train"] == 12
    assert report["secrets"]["found"]["github_token"] == 1 and report["secrets"]["found"]["assignment"] == 1
    md = (cfg.reports_dir / "data.md").read_text(encoding="utf-8")
    assert "## Credentials" in md and "| github_token | 1 | 1 |" in md and "Dropped for credentials: 2." in md
    splits, _ = read_prepared(cfg)
    assert not any(GITHUB in json.dumps(r) or "hunter2x" in json.dumps(r) for r in splits["train"])

    cfg = load_config(write_config(tmp_path / "m.yaml", {**settings, "data": {**settings["data"], "secrets": "mask"}}))
    prepare_data(cfg)
    splits, _ = read_prepared(cfg)
    texts = json.dumps(splits["train"], ensure_ascii=False)
    assert len(splits["train"]) == 14 and "[GITHUB_TOKEN]" in texts and "password=[ASSIGNMENT]" in texts
    assert GITHUB not in texts and "hunter2x" not in texts


def test_nothing_left_names_the_credentials(tmp_path, tiny_phi3_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": f"鍵: {AWS}"}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(tiny_phi3_dir, tmp_path / "build",
                                                                     data={"train": str(data)})))
    with pytest.raises(DataError, match="1 dropped for credentials"):
        prepare_data(cfg)
    assert not cfg.prepared_dir.exists()


@pytest.mark.reliability("bad-input")
def test_a_bad_policy_is_refused_at_load(tmp_path, tiny_phi3_dir):
    settings = small_config(tiny_phi3_dir, tmp_path / "build", data={"train": str(tmp_path / "d.jsonl"),
                                                                     "secrets": "hide"})
    with pytest.raises(ConfigError, match="data.secrets"):
        load_config(write_config(tmp_path / "c.yaml", settings))
