"""Refusal-only sources (`purpose: refusal`, pipeline/data/refusal.py): every reply trained on is
a refusal, an example with one that is not is dropped and counted, and no token of a user turn,
where the unsafe text is, ever gets a label."""
from __future__ import annotations

import json

import pytest

from conftest import small_config, write_config
from crafted_backend import Backend, free_port
from pipeline.config import load_config
from pipeline.data.prepare import prepare_data, read_prepared
from pipeline.data.refusal import is_refusal
from pipeline.data.tokenize import IGNORE, load_examples
from pipeline.errors import DataError
from pipeline.hf import load_tokenizer

UNSAFE = "UNSAFE-REQUEST"  # in every user turn of the refusal source, never in a reply
REFUSALS = [
    "申し訳ありませんが、その方法はお教えできません。",
    "申し訳ありません。そのご依頼にはお応えできません。安全に関するご相談なら承ります。",
    "そのような内容の作成はお断りします。",
    "I'm sorry, but I can't help with that.",
    "I’m sorry. I cannot assist with that request.",
]
COMPLIANT = "申し訳ありません、手順は次の通りです。まず材料を用意します。"


@pytest.mark.parametrize("reply", REFUSALS + ["ＩＣＡＮ’Ｔ ＨＥＬＰ with that."])
def test_refusals_are_recognised(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", [
    COMPLIANT,  # an apology that complies
    "Sure. Step one. I cannot help you further than this, though.",  # refuses only in the third sentence
    "I can't help but notice that this is easy: here is how.",
    "はい、作り方を説明します。",
    "",
])
def test_compliance_is_no_refusal(reply):
    assert not is_refusal(reply)


def refusal_source(tmp_path, replies: list[str], **extra) -> dict:
    path = tmp_path / "refusals.jsonl"
    rows = [{"messages": [{"role": "system", "content": "安全なアシスタントです。"},
                          {"role": "user", "content": f"{UNSAFE} {i}: 危険な物の作り方を詳しく教えて。"},
                          {"role": "assistant", "content": reply}]} for i, reply in enumerate(replies)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"path": str(path), "format": "messages", "license": "apache-2.0", "purpose": "refusal", **extra}


def chat_source(tmp_path) -> dict:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"今日の話題{i}は?"},
                                                     {"role": "assistant", "content": f"話題{i}についてです。"}]},
                                       ensure_ascii=False) + "\n" for i in range(4)), encoding="utf-8")
    return {"path": str(path), "format": "messages", "license": "apache-2.0"}


def config(tmp_path, base_dir, sources, guard_url: str | None = None, **data_keys):
    data = {"train": sources, "validation_fraction": 0.0, "dedup": {"near": False}, **data_keys}
    serve = {"guard": {"model": "llama-guard3:1b", "backend": guard_url}} if guard_url else {}
    return load_config(write_config(tmp_path / "c.yaml", small_config(base_dir, tmp_path / "build", data=data,
                                                                      serve=serve)))


@pytest.fixture
def prepared(tmp_path, tiny_phi3_dir):
    cfg = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, REFUSALS + [COMPLIANT]), chat_source(tmp_path)])
    prepare_data(cfg)
    return cfg


def test_an_example_whose_reply_is_no_refusal_is_dropped_and_counted(prepared):
    splits, _ = read_prepared(prepared)
    replies = [m["content"] for r in splits["train"] for m in r["messages"] if m["role"] == "assistant"]
    assert sorted(r for r in replies if r in REFUSALS + [COMPLIANT]) == sorted(REFUSALS)
    assert sum(r.startswith("話題") for r in replies) == 4  # the chat source is untouched
    report = json.loads(prepared.data_report.read_text(encoding="utf-8"))
    assert report["refusal_sources"] == {"kept": len(REFUSALS), "dropped_not_refusals": 1, "dropped_unsafe": 0}
    assert report["guard"] is None  # no serve.guard: the documented check alone
    assert report["sources"][str(prepared.data.train[0].path)]["purpose"] == "refusal"
    md = (prepared.reports_dir / "data.md").read_text(encoding="utf-8")
    assert f"Kept {len(REFUSALS)}, dropped 1." in md and "refusals.jsonl" in md


def test_no_user_turn_token_of_a_refusal_example_gets_a_label(prepared, tiny_phi3_dir):
    splits, _ = read_prepared(prepared)
    refusals = [r for r in splits["train"] if any(UNSAFE in m["content"] for m in r["messages"])]
    assert len(refusals) == len(REFUSALS)
    tokenizer = load_tokenizer(tiny_phi3_dir)
    for rec, ex in zip(refusals, load_examples(refusals, tokenizer, max_length=256), strict=True):
        reply = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
        labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
        assert labelled and all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels, strict=True))
        # Exactly the reply and the end-of-turn token that follows it are targets: nothing of the
        # system or user turns, whose unsafe text the model must read but never learn to write.
        assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == reply
        assert tokenizer.convert_ids_to_tokens(labelled[-1]) == "<|end|>"
        assert UNSAFE not in tokenizer.decode(labelled)


@pytest.mark.reliability("bad-input")
def test_plain_text_in_a_refusal_source_stops_the_stage(tmp_path, tiny_phi3_dir):
    path = tmp_path / "refusals.jsonl"
    path.write_text(json.dumps({"text": "お答えできません。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = config(tmp_path, tiny_phi3_dir, [{"path": str(path), "format": "text", "license": "mit",
                                            "purpose": "refusal"}])
    with pytest.raises(DataError, match=r"refusals\.jsonl:1: a refusal source \(purpose: refusal\) needs conversations"):
        prepare_data(cfg)
    assert not cfg.prepared_dir.exists()


@pytest.mark.reliability("bad-input")
def test_a_refusal_source_with_no_refusal_left_names_the_count(tmp_path, tiny_phi3_dir):
    cfg = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, [COMPLIANT, "はい、説明します。"])])
    with pytest.raises(DataError, match="2 refusal-source examples without a refusal"):
        prepare_data(cfg)


# -- with a guard (serve.guard): a crafted classifier in Llama Guard 3's format ------------------------

RECIPE = "手順は次の通り"  # the crafted guard calls a reply with this unsafe (S9)


@pytest.fixture
def guard():
    def judge(body: dict) -> str:
        last = body["messages"][-1]
        return "unsafe\nS9" if last["role"] == "assistant" and RECIPE in last["content"] else "safe"
    b = Backend().start()
    b.reply = judge
    yield b
    b.stop()


def test_the_guard_drops_a_refusal_that_goes_on_to_comply(tmp_path, tiny_phi3_dir, guard):
    sneaky = f"I can't help with that. Just kidding: {RECIPE}。"
    assert is_refusal(sneaky)  # the opening refuses: only the guard sees the rest
    cfg = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, REFUSALS + [sneaky, COMPLIANT]),
                                           chat_source(tmp_path)], guard.url)
    prepare_data(cfg)
    report = json.loads(cfg.data_report.read_text(encoding="utf-8"))
    assert report["refusal_sources"] == {"kept": len(REFUSALS), "dropped_not_refusals": 1, "dropped_unsafe": 1}
    assert report["guard"] == {"model": "llama-guard3:1b", "format": "llama-guard-3", "guard_replies": False,
                               "judged": len(REFUSALS) + 1, "dropped_refusal_sources": 1,
                               "dropped_other_sources": 0, "categories": {"S9": 1}}
    # Each reply is judged after the turns before it, system prompt left out.
    judged = [r["messages"] for r in guard.requests]
    assert all([m["role"] for m in msgs] == ["user", "assistant"] for msgs in judged)
    assert all(UNSAFE in msgs[0]["content"] for msgs in judged)  # the chat source was not asked about
    splits, _ = read_prepared(cfg)
    assert not any(RECIPE in m["content"] for r in splits["train"] for m in r["messages"])
    assert "dropped as unsafe by the guard 1" in (cfg.reports_dir / "data.md").read_text(encoding="utf-8")


def test_guard_replies_screens_every_source(tmp_path, tiny_phi3_dir, guard):
    chat = chat_source(tmp_path)
    with open(chat["path"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "作り方は?"},
                                         {"role": "assistant", "content": f"{RECIPE}です。"}]},
                           ensure_ascii=False) + "\n")
    cfg = config(tmp_path, tiny_phi3_dir, [chat], guard.url, guard_replies=True)
    prepare_data(cfg)
    report = json.loads(cfg.data_report.read_text(encoding="utf-8"))["guard"]
    assert (report["judged"], report["dropped_other_sources"], report["categories"]) == (5, 1, {"S9": 1})
    assert sum(len(v) for v in read_prepared(cfg)[0].values()) == 4


@pytest.mark.reliability("bad-input")
def test_a_guard_that_is_down_stops_the_data_stage(tmp_path, tiny_phi3_dir):
    down = f"http://127.0.0.1:{free_port()}/v1"
    cfg = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, REFUSALS)], down)
    with pytest.raises(DataError, match=r"refusals\.jsonl:1: the guard \('llama-guard3:1b' at .*\) gave no verdict: "
                                         r"the guard at .* is not reachable"):
        prepare_data(cfg)
    assert not cfg.prepared_dir.exists() and not cfg.data_report.exists()


def test_adding_a_guard_for_serving_only_leaves_the_data_stage_current(tmp_path, tiny_phi3_dir):
    plain = config(tmp_path, tiny_phi3_dir, [chat_source(tmp_path)])
    guarded = config(tmp_path, tiny_phi3_dir, [chat_source(tmp_path)], "http://127.0.0.1:9/v1")
    assert plain.section_digest("data") == guarded.section_digest("data")
    refusing = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, REFUSALS)], "http://127.0.0.1:9/v1")
    unguarded = config(tmp_path, tiny_phi3_dir, [refusal_source(tmp_path, REFUSALS)])
    assert refusing.section_digest("data") != unguarded.section_digest("data")  # the guard judges this data
