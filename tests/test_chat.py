"""Talking to a checkpoint: the documented Python call and `python -m pipeline chat`."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO
from pipeline.chat import reply
from pipeline.hf import load_trained

METRIC_FIELDS = {"step", "phase", "alpha", "gate", "loss", "lm_loss", "ortho_error", "lr", "grad_norm",
                 "tokens_per_s", "elapsed_s", "val_loss"}


def test_load_trained_is_base_plus_adapter_plus_soul(trained_run):
    from test_fuse import trained_model

    model, tok = load_trained(trained_run.final_checkpoint, device=torch.device("cpu"))
    reference = trained_model(trained_run.resolve(trained_run.model.base), trained_run.final_checkpoint)
    ids = tok("こんにちは。", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    text = reply(model, tok, [{"role": "user", "content": "こんにちは"}], max_new_tokens=5)
    assert isinstance(text, str) and "<|" not in text


def test_chat_command_answers_and_reads_a_conversation(trained_run):
    """The command prints what `reply` answers: to --prompt, and turn by turn to a conversation
    read from stdin, each turn answered with the whole conversation so far."""
    ckpt = str(trained_run.final_checkpoint)
    model, tok = load_trained(trained_run.final_checkpoint, device=torch.device("cpu"))
    first, second = {"role": "user", "content": "こんにちは"}, {"role": "user", "content": "ありがとう"}

    def answer(*messages: dict) -> str:
        return reply(model, tok, list(messages), max_new_tokens=8)

    one = subprocess.run([sys.executable, "-m", "pipeline", "chat", "--checkpoint", ckpt, "--prompt", "こんにちは",
                          "--max-new-tokens", "8"], cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    a1 = answer(first)
    assert one.stdout == a1 + "\n"
    many = subprocess.run([sys.executable, "-m", "pipeline", "chat", "--checkpoint", ckpt, "--max-new-tokens", "8"],
                          cwd=REPO, capture_output=True, text=True, input="こんにちは\nありがとう\n\nnot read\n")
    assert many.returncode == 0, many.stderr[-2000:]
    a2 = answer(first, {"role": "assistant", "content": a1}, second)
    assert a1 and a2 and many.stdout == f"{a1}\n{a2}\n", many.stdout


def test_chat_answers_each_turn_with_the_conversation_so_far(trained_run, monkeypatch, capsys):
    """What `chat` hands `reply` per turn: the tiny model's answers hardly depend on their context,
    so the conversation is checked where it is built."""
    import io

    from pipeline import chat

    asked: list[list[dict]] = []

    def recording_reply(model, tokenizer, messages, **kw):
        asked.append([dict(m) for m in messages])
        return f"answer {len(asked)}"

    monkeypatch.setattr(chat, "reply", recording_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n  ありがとう \n\nnot read\n"))
    chat.chat(trained_run.final_checkpoint, system="丁寧に答えてください。", max_new_tokens=4)
    system = {"role": "system", "content": "丁寧に答えてください。"}
    assert asked == [
        [system, {"role": "user", "content": "こんにちは"}],
        [system, {"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "answer 1"},
         {"role": "user", "content": "ありがとう"}],
    ]
    assert capsys.readouterr().out == "answer 1\nanswer 2\n"


def test_chat_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "chat", "--checkpoint", str(tmp_path), "--prompt", "x"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr


def test_every_step_is_logged_with_all_fields(trained_run):
    rows = [json.loads(x) for x in (trained_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == METRIC_FIELDS for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] >= 0 for r in rows)
    assert rows[-1]["val_loss"] > 0  # the last step always evaluates the validation split
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
