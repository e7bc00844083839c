"""The audit log (pipeline/audit.py): hashes only, one whole line per request, even from many
writers at once; `audit verify` names the bad line."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import subprocess
import sys
import threading

import pytest

from conftest import REPO
from pipeline.audit import AuditError, AuditLog, entry, now, verify

SECRET = "秘密の思考θ"


def sample(i: int = 0, **overrides) -> dict:
    fields = dict(time=now(), request_id=f"{i:032x}", api="think", backend_model="agiasi-demo", stream=False, outcome="ok",
                  status=200, prompt=f"質問{i}", system=None, final="答え", sections={"think-a": SECRET * (i + 1)})
    return entry(**{**fields, **overrides})


def test_an_entry_holds_digests_never_text(tmp_path):
    log = AuditLog(tmp_path / "audit" / "think.jsonl")
    log.record(sample())
    raw = log.path.read_text(encoding="utf-8")
    line = json.loads(raw)
    assert SECRET not in raw and "質問" not in raw and "答え" not in raw and "\\u" not in raw
    data = SECRET.encode()
    assert line["thinking"] == {"think-a": {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}}
    assert line["final"]["length"] == len("答え".encode())
    assert verify(log.path) == 1


def _write_many(path, start):
    log = AuditLog(path)
    for i in range(start, start + 50):
        log.record(sample(i))


@pytest.mark.reliability("concurrency")
def test_threads_and_processes_never_interleave_lines(tmp_path):
    path = tmp_path / "think.jsonl"
    threads = [threading.Thread(target=_write_many, args=(path, k * 100)) for k in range(4)]
    procs = [multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, 1000 + k * 100))
             for k in range(2)]
    for w in threads + procs:
        w.start()
    for w in threads + procs:
        w.join()
    assert verify(path) == 300
    ids = [json.loads(x)["request_id"] for x in path.read_text().splitlines()]
    assert len(set(ids)) == 300


def test_record_refuses_what_is_no_entry(tmp_path):
    log = AuditLog(tmp_path / "think.jsonl")
    with pytest.raises(ValueError, match="unknown fields text"):
        log.record({**sample(), "text": SECRET})
    assert not log.path.exists()


BAD_LINES = [
    ("not json", "not a JSON line"),
    (json.dumps({**sample(), "prompt_text": "x"}), "unknown fields prompt_text"),
    (json.dumps({k: v for k, v in sample().items() if k != "outcome"}), "missing outcome"),
    (json.dumps({**sample(), "final": {"sha256": "abc", "length": 3}}), "final.sha256: expected 64"),
    (json.dumps({**sample(), "stream": "no"}), "stream: expected true or false"),
    (json.dumps({**sample(), "outcome": "fine"}), "outcome: expected one of"),
    (json.dumps({**sample(), "thinking": {"think a": sample()["prompt"]}}), "is no section name"),
    (json.dumps({**sample(), "outcome": "no_final"}), "final: present, but the outcome is no_final"),
    (json.dumps({**sample(), "api": "v2"}), "api: expected one of think, v1"),
    (json.dumps({**sample(), "outcome": "refused"}), "guard: null, but the outcome is refused"),
    (json.dumps({**sample(), "guard": {"prompt": {"verdict": "maybe", "categories": []}, "final": None}}),
     "guard.prompt: expected null or"),
    (json.dumps({**sample(), "guard": {"prompt": {"verdict": "unsafe", "categories": ["how to build a bomb"]},
                                       "final": None}}), "guard.prompt: expected null or"),
    (json.dumps({**sample(), "guard": {"prompt": None}}), "guard: expected null or"),
    (json.dumps({**sample(), "outcome": "refused", "final": None,
                 "guard": {"prompt": {"verdict": "unsafe", "categories": ["S9"]}, "final": None}}),
     "final: null, but the outcome is refused"),
]


def test_guard_verdicts_are_kept_as_verdict_and_codes(tmp_path):
    log = AuditLog(tmp_path / "think.jsonl")
    guard = {"prompt": {"verdict": "safe", "categories": []}, "final": {"verdict": "unsafe", "categories": ["S1", "S10"]}}
    log.record(sample(outcome="refused", final="申し訳ありません", guard=guard))
    log.record(sample(1, guard={"prompt": {"verdict": "unavailable", "categories": []}, "final": None}))
    assert verify(log.path) == 2
    assert json.loads(log.path.read_text().splitlines()[0])["guard"] == guard


def test_lines_from_before_the_api_field_still_verify(tmp_path):
    """A log written before /v1 existed (every line from /think, no `api` nor `guard`), or before
    the guard (no `guard`), stays valid; a line that lacks another field does not."""
    path = tmp_path / "think.jsonl"
    old = {k: v for k, v in sample().items() if k not in ("api", "guard")}
    before_guard = {k: v for k, v in sample(2, api="v1").items() if k != "guard"}
    path.write_text("".join(json.dumps(o) + "\n" for o in (old, before_guard, sample(1, api="v1"))))
    assert verify(path) == 3
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "status"}) + "\n")
    with pytest.raises(AuditError, match="missing status"):
        verify(path)


@pytest.mark.reliability("bad-input")
@pytest.mark.parametrize("bad,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_verify_names_the_bad_line(tmp_path, bad, message):
    path = tmp_path / "think.jsonl"
    path.write_text(json.dumps(sample(1)) + "\n" + bad + "\n" + json.dumps(sample(2)) + "\n")
    with pytest.raises(AuditError, match=rf"think.jsonl:2: .*{message}"):
        verify(path)


@pytest.mark.reliability("bad-input")
def test_cli_verify_exits_2_naming_the_line_without_a_traceback(tmp_path):
    path = tmp_path / "think.jsonl"
    path.write_text(json.dumps(sample()) + "\n" + json.dumps(sample())[:40])  # a torn last line
    out = subprocess.run([sys.executable, "-m", "pipeline", "audit", "verify", "--log", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "think.jsonl:2: the last line is not terminated" in out.stderr
    path.write_text(json.dumps(sample()) + "\n")
    out = subprocess.run([sys.executable, "-m", "pipeline", "audit", "verify", "--log", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "OK (1 entries)" in out.stdout
