"""The training monitor: its status block, and following a metrics.jsonl that grows.

Runs on a synthetic metrics file in train.py's format (tests/metrics_fixture.py):
60 steps, chaos 1-10, transition 11-50, order 51-60. No model is trained.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from metrics_fixture import fixture_config, metric_rows, write_metrics
from pipeline.config import CHECKPOINT_MARKER, load_config
from pipeline.monitor import MetricsFollower, monitor, phase_spans, render, training_finished
from pipeline.soul import phase_at


@pytest.fixture
def cfg(tmp_path):
    return load_config(fixture_config(tmp_path))


def line(text: str, key: str) -> str:
    """The status block's line for `key` (e.g. 'phase'), without the key."""
    for ln in text.splitlines():
        if ln.startswith(key + " "):
            return ln[len(key):].strip()
    raise AssertionError(f"no {key!r} line in:\n{text}")


def write_marker(cfg, digest: str | None = None) -> None:
    cfg.final_checkpoint.mkdir(parents=True, exist_ok=True)
    (cfg.final_checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(
        {"step": cfg.train.steps, "train_config_sha256": digest or cfg.section_digest("train")}))


def test_phase_spans_follow_the_phases_train_logs(cfg):
    assert phase_spans(cfg) == [("chaos", 0, 10), ("transition", 10, 50), ("order", 50, 60)]
    for step in range(1, cfg.train.steps + 1):  # train.py logs step s with phase_at(s - 1)
        (name,) = [n for n, start, end in phase_spans(cfg) if start < step <= end]
        assert name == phase_at(step - 1, cfg.soul)
    no_chaos = cfg.model_copy(update={"soul": cfg.soul.model_copy(update={"warmup_steps": 0})})
    assert [n for n, _, _ in phase_spans(no_chaos)] == ["transition", "order"]


def test_render_mid_transition(cfg):
    rows = metric_rows(cfg, 30)
    text = render(rows, cfg)
    assert render(rows, cfg) == text  # pure
    assert line(text, "step").startswith("30 / 60") and "50.0%" in line(text, "step")
    assert line(text, "phase").startswith("transition")
    assert "chaos 1-10 | [transition 11-50] | order 51-60" in line(text, "phase")
    assert line(text, "alpha").startswith(f"{rows[-1]['alpha']:+.4f}") and "+1.6180" in line(text, "alpha")
    assert line(text, "gate").startswith(f"{rows[-1]['gate']:.4f}") and "0.8345" in line(text, "gate")
    loss = line(text, "loss")
    assert loss.startswith(f"{rows[-1]['loss']:.4f}") and "first 12.0000" in loss and "falling" in loss
    assert line(text, "ortho err") == f"{rows[-1]['ortho_error']:.3e}"
    assert line(text, "tokens/s") == "529"
    best = min(r["val_loss"] for r in rows if r["val_loss"] is not None)
    assert line(text, "val loss") == f"{rows[29]['val_loss']:.4f}    at step 30, best {best:.4f}"
    assert "val loss" not in render([{**r, "val_loss": None} for r in rows], cfg)
    assert line(text, "time") == "0:00:15 elapsed, ETA 0:00:15"  # 0.5 s per step, 30 steps to go
    assert line(text, "status") == "training"


def test_render_phases_and_ends(cfg):
    rows = metric_rows(cfg)
    assert line(render(rows[:4], cfg), "phase").startswith("chaos")
    assert "[chaos 1-10]" in line(render(rows[:10], cfg), "phase")
    assert line(render(rows[:51], cfg), "phase").startswith("order")
    empty = render([], cfg)
    assert line(empty, "step").startswith("0 / 60") and line(empty, "status") == "waiting for training"
    done = render(rows, cfg, finished=True)
    assert line(done, "status").startswith("finished") and line(done, "time") == "0:00:30 elapsed"
    assert "waiting for final/" in line(render(rows, cfg), "status")
    assert "no new step for 0:02:00" in line(render(rows[:20], cfg, idle_s=120), "status")
    rising = [dict(r, loss=float(r["step"])) for r in rows[:20]]
    assert "rising" in line(render(rising, cfg), "loss")


def test_follower_handles_missing_partial_and_rewritten_files(cfg):
    path = cfg.metrics_path
    rows = [json.dumps(r) + "\n" for r in metric_rows(cfg, 8)]
    f = MetricsFollower(path)
    assert not f.poll() and f.rows == []  # no file yet
    path.parent.mkdir(parents=True)
    path.write_text("".join(rows[:3]) + rows[3][:20])  # a line still being written
    assert f.poll() and [r["step"] for r in f.rows] == [1, 2, 3]
    assert not f.poll()
    with path.open("a") as out:
        out.write(rows[3][20:] + rows[4])
    assert f.poll() and [r["step"] for r in f.rows] == [1, 2, 3, 4, 5]
    # A resumed run rewrites the file (atomic rename) with the rows up to its checkpoint, then appends.
    tmp = path.with_name("new.jsonl")
    tmp.write_text("".join(rows[:2]) + rows[2])
    os.replace(tmp, path)
    assert f.poll() and [r["step"] for r in f.rows] == [1, 2, 3]
    with path.open("a") as out:
        out.write("{\"step\": 4, \"cut by a ki\n" + rows[3])  # a line cut by kill -9 is skipped
    assert f.poll() and [r["step"] for r in f.rows] == [1, 2, 3, 4]
    path.write_text(rows[0])  # truncated in place
    assert f.poll() and [r["step"] for r in f.rows] == [1]
    path.unlink()
    assert f.poll() and f.rows == []


def test_monitor_follows_a_growing_file_until_training_ends(cfg):
    rows = metric_rows(cfg)

    def trainer():  # writes like train.py: append + flush per step, the final marker last
        time.sleep(0.2)
        cfg.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with cfg.metrics_path.open("a") as out:
            for r in rows:
                out.write(json.dumps(r) + "\n")
                out.flush()
                time.sleep(0.01)
        time.sleep(0.1)
        write_marker(cfg)

    out = io.StringIO()
    writer = threading.Thread(target=trainer, daemon=True)
    writer.start()
    done = threading.Thread(target=monitor, args=(cfg,), kwargs=dict(interval=0.02, print_every=0, out=out),
                            daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive(), "the monitor did not end when training ended"
    blocks = [b for b in out.getvalue().split("\n\n") if b.strip()]
    steps = [int(line(b, "step").split("/")[0]) for b in blocks]
    assert steps[0] == 0 and line(blocks[0], "status") == "waiting for training"
    assert steps == sorted(steps) and len(set(steps)) >= 4, steps  # it saw the file grow
    assert any(0 < s < 60 for s in steps)
    assert steps[-1] == 60 and line(blocks[-1], "status").startswith("finished")
    assert "\x1b[" not in out.getvalue()  # no terminal codes on a pipe


def test_monitor_redraws_in_place_on_a_terminal(cfg):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    write_metrics(cfg.metrics_path, metric_rows(cfg))
    write_marker(cfg)
    out = Terminal()
    monitor(cfg, out=out)
    assert out.getvalue().startswith("\x1b[J") and "finished" in out.getvalue()


def test_only_this_configs_final_checkpoint_ends_the_watch(cfg):
    assert not training_finished(cfg)
    write_marker(cfg, digest="0" * 64)  # left by a run of another config
    assert not training_finished(cfg)
    write_marker(cfg)
    assert training_finished(cfg)


def test_monitor_command_and_make_target(cfg):
    write_metrics(cfg.metrics_path, metric_rows(cfg, 25))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "monitor", "--config", str(cfg.source), "--once"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert line(proc.stdout, "step").startswith("25 / 60") and "transition" in line(proc.stdout, "phase")
    write_metrics(cfg.metrics_path, metric_rows(cfg))
    write_marker(cfg)
    # Through Make, as `docker exec <container> make monitor` runs it: no terminal, ends with training.
    proc = subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", "monitor", f"CONFIG={cfg.source}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stderr
    assert line(proc.stdout, "step").startswith("60 / 60") and "finished" in line(proc.stdout, "status")
