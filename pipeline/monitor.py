"""Watch a training run: a live status block read from `<run>/metrics.jsonl`.

    make monitor [CONFIG=config.yaml]
    python -m pipeline monitor --config demo.yaml [--once] [--interval 1]

Training appends one JSON row per step to metrics.jsonl (train.StepMetrics).
`MetricsFollower` reads what has been appended since the last look: it waits
for a file that does not exist yet, leaves a half-written last line for the
next look, and starts over when a resumed run rewrites the file. `render`
turns the rows into the status block (a pure function of rows and config:
step of total, phase, alpha, gate, loss trend, orthogonality error, tokens/s,
ETA). `monitor` polls and shows it until the final checkpoint of this config
exists. On a terminal the block is redrawn in place; on a pipe (`docker exec`
without -t, a log file) a new block is printed when steps arrive, at most
every `print_every` seconds, and once more at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from .config import Config
from .soul import phase_at, sigmoid

TREND_WINDOW = 10  # steps averaged on each side of the loss trend


class MetricsFollower:
    """Incremental reader of a metrics.jsonl that another process is writing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._offset = 0
        self._file_id: tuple[int, int] | None = None

    def poll(self) -> bool:
        """Read what was appended since the last poll; True when `rows` changed."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below; fstat needs the open file)
        except FileNotFoundError:
            changed = bool(self.rows)
            self._start_over(None)
            return changed
        with f:
            st = os.fstat(f.fileno())
            file_id = (st.st_dev, st.st_ino)
            changed = False
            # A resumed run replaces the file (atomic rename: a new inode); a
            # truncated one shrinks. Either way, read it again from the start.
            if file_id != self._file_id or st.st_size < self._offset:
                changed = bool(self.rows)
                self._start_over(file_id)
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return changed  # nothing new, or only the start of a line still being written
        self._offset += end + 1
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed run
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            # A resumed run logs again from its checkpoint's step: newer rows replace older ones.
            while self.rows and self.rows[-1]["step"] >= row["step"]:
                self.rows.pop()
            self.rows.append(row)
            changed = True
        return changed

    def _start_over(self, file_id: tuple[int, int] | None) -> None:
        self.rows, self._offset, self._file_id = [], 0, file_id


def phase_spans(cfg: Config) -> list[tuple[str, int, int]]:
    """(phase, start, end) on the metrics' step axis: rows with start < step <= end.

    The row of step s (s steps done) was trained with alpha of the 0-based
    step s - 1, so its phase is `phase_at(s - 1)`, as train.py logs it.
    Phases that last no step are left out.
    """
    spans: list[list] = []
    for i in range(cfg.train.steps):
        name = phase_at(i, cfg.soul)
        if spans and spans[-1][0] == name:
            spans[-1][2] = i + 1
        else:
            spans.append([name, i, i + 1])
    return [(name, start, end) for name, start, end in spans]


def training_finished(cfg: Config) -> bool:
    """The final checkpoint of this very config exists (an older config's does not count)."""
    from .checkpoint import read_marker

    marker = read_marker(cfg.final_checkpoint)
    return marker is not None and marker.get("train_config_sha256") == cfg.section_digest("train")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def loss_trend(losses: list[float], window: int = TREND_WINDOW) -> str:
    """'falling', 'rising' or 'flat': the mean of the last `window` losses against the `window` before."""
    k = min(window, len(losses) // 2)
    if k == 0:
        return "too early to tell"
    recent, before = _mean(losses[-k:]), _mean(losses[-2 * k:-k])
    word = "flat" if abs(recent - before) <= 1e-3 * abs(before) else "falling" if recent < before else "rising"
    return f"{word} (last {k} avg {recent:.4f} vs {before:.4f} before)"


def seconds_per_step(rows: list[dict], window: int = TREND_WINDOW) -> float | None:
    """Recent wall-clock seconds per step, from elapsed_s."""
    if not rows:
        return None
    last = rows[-1]
    first = rows[-window - 1] if len(rows) > window else None
    if first is None:
        return last["elapsed_s"] / last["step"] if last["step"] else None
    return (last["elapsed_s"] - first["elapsed_s"]) / max(last["step"] - first["step"], 1)


def render(rows: list[dict], cfg: Config, *, finished: bool = False, idle_s: float | None = None) -> str:
    """The status block for these metrics rows (pure: same input, same text)."""
    total = cfg.train.steps
    s = cfg.soul
    step = rows[-1]["step"] if rows else 0
    phase = rows[-1].get("phase", phase_at(step - 1, s)) if rows else phase_at(0, s)
    spans = " | ".join(
        f"[{name} {start + 1}-{end}]" if name == phase else f"{name} {start + 1}-{end}"
        for name, start, end in phase_spans(cfg)
    )
    filled = round(24 * step / total)
    lines = [
        f"AGIASI soul training: run {cfg.run.name} ({cfg.metrics_path})",
        f"step       {step} / {total}  [{'#' * filled}{'-' * (24 - filled)}] {100 * step / total:5.1f}%",
        f"phase      {phase}   ({spans})",
    ]
    if not rows:
        lines.append("metrics    none yet: training has not finished its first step")
    else:
        r = rows[-1]
        losses = [x["loss"] for x in rows]
        sps = seconds_per_step(rows)
        lines += [
            f"alpha      {r['alpha']:+.4f}   (target {s.alpha_target:+.4f})",
            f"gate       {r['gate']:.4f}    (target {sigmoid(s.alpha_target):.4f})",
            f"loss       {r['loss']:.4f}    first {losses[0]:.4f}, best {min(losses):.4f}; trend {loss_trend(losses)}",
            f"ortho err  {r['ortho_error']:.3e}",
            f"tokens/s   {r['tokens_per_s']:,.0f}",
        ]
        evaluated = [x for x in rows if x.get("val_loss") is not None]  # rows of older runs have no val_loss
        if evaluated:
            v = evaluated[-1]
            lines.insert(-2, f"val loss   {v['val_loss']:.4f}    at step {v['step']}, "
                             f"best {min(x['val_loss'] for x in evaluated):.4f}")
        if finished or step >= total:
            lines.append(f"time       {_duration(r['elapsed_s'])} elapsed")
        else:
            eta = "unknown" if sps is None else _duration((total - step) * sps)
            lines.append(f"time       {_duration(r['elapsed_s'])} elapsed, ETA {eta}")
    if finished:
        status = f"finished: {cfg.final_checkpoint} written"
    elif step >= total:
        status = f"all steps logged; waiting for {cfg.final_checkpoint.name}/ to be written"
    elif idle_s is not None and idle_s >= 60:
        status = f"training? no new step for {_duration(idle_s)}"
    else:
        status = "training" if rows else "waiting for training"
    lines.append(f"status     {status}")
    return "\n".join(lines)


def monitor(cfg: Config, *, once: bool = False, interval: float = 1.0, print_every: float = 10.0,
            out: TextIO | None = None) -> None:
    """Show the run's status until its training is finished (or once, with `once`).

    out: where to write (default stdout); redrawn in place when it is a terminal.
    """
    out = out or sys.stdout
    tty = out.isatty()
    follower = MetricsFollower(cfg.metrics_path)
    shown_lines, last_print, last_change, unshown = 0, None, time.monotonic(), False
    try:
        while True:
            # The marker is looked at before the file, so the rows read after
            # it include the last step.
            finished = training_finished(cfg)
            changed = follower.poll()
            now = time.monotonic()
            if changed:
                last_change, unshown = now, True
            text = render(follower.rows, cfg, finished=finished, idle_s=now - last_change)
            if tty:
                width = shutil.get_terminal_size().columns
                lines = [line[:width - 1] for line in text.splitlines()]
                up = f"\x1b[{shown_lines}F" if shown_lines else ""
                out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
                shown_lines = len(lines)
            elif last_print is None or once or finished or (unshown and now - last_print >= print_every):
                out.write(text + "\n\n")
                last_print, unshown = now, False
            out.flush()
            if once or finished:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
