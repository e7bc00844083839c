"""Figures of a run, drawn from a fixture metrics file (tests/metrics_fixture.py).

60 steps: chaos 1-10, transition 11-50, order 51-60. The PNGs must not be
blank, and the shaded phases must sit where the schedule puts them, both in
the figure's geometry and in the pixels written.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from conftest import REPO
from metrics_fixture import fixture_config, metric_rows, write_metrics
from pipeline.config import load_config
from pipeline.plots import PHASE_ALPHA, PHASE_COLORS, phase_figure, plots, save_png, training_figure

EXPECTED_SPANS = [("chaos", 0, 10), ("transition", 10, 50), ("order", 50, 60)]


@pytest.fixture
def cfg(tmp_path):
    cfg = load_config(fixture_config(tmp_path))
    write_metrics(cfg.metrics_path, metric_rows(cfg))
    return cfg


def spans(ax) -> list[tuple[str, float, float]]:
    """The phase shadings of an axes: (phase, x from, x to)."""
    out = []
    for patch in ax.patches:
        if patch.get_label().startswith("_phase:"):
            box = patch.get_bbox()  # x in data coordinates (axvspan: y spans the axes)
            out.append((patch.get_label().split(":", 1)[1], float(box.x0), float(box.x1)))
    return out


def shade(name: str) -> np.ndarray:
    """The colour of a phase's shading over the white background."""
    return PHASE_ALPHA * np.array(to_rgb(PHASE_COLORS[name])) + (1 - PHASE_ALPHA) * np.ones(3)


def pixel(image: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """RGB of the written PNG at data point (x, y) of `ax`."""
    px, py = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - py)), int(round(px)), :3]


def test_phase_figure_shades_the_phases_where_the_schedule_puts_them(cfg, tmp_path):
    rows = metric_rows(cfg)
    fig = phase_figure(rows, cfg)
    ax_alpha, ax_gate = fig.axes
    assert spans(ax_alpha) == EXPECTED_SPANS and spans(ax_gate) == EXPECTED_SPANS
    assert [t.get_text() for t in ax_alpha.texts] == ["chaos", "transition", "order"]
    line = ax_alpha.get_lines()[0]
    assert list(line.get_xdata()) == [r["step"] for r in rows]
    assert list(line.get_ydata()) == [r["alpha"] for r in rows]
    assert list(ax_gate.get_lines()[0].get_ydata()) == [r["gate"] for r in rows]

    path = save_png(fig, tmp_path / "phases.png")
    image = imread(path)
    assert image.std() > 0.05, "blank figure"
    # Background points (no line, legend or grid there) take their phase's colour.
    for x, phase in ((5, "chaos"), (25, "transition"), (45, "transition"), (55, "order")):
        got = pixel(image, ax_gate, x, 0.7)
        nearest = min(PHASE_COLORS, key=lambda name: np.abs(shade(name) - got).sum())
        assert nearest == phase and np.abs(shade(phase) - got).max() < 0.03, (x, got)
    # The alpha line is drawn: dark pixels at alpha(step) in chaos, none far above it.
    assert pixel(image, ax_alpha, 5, -5.0).max() < 0.5
    assert pixel(image, ax_alpha, 5, -1.0).min() > 0.7


def test_training_figure_has_loss_and_log_ortho(cfg, tmp_path):
    rows = metric_rows(cfg)
    fig = training_figure(rows, cfg)
    ax_loss, ax_ortho = fig.axes
    assert spans(ax_loss) == EXPECTED_SPANS and spans(ax_ortho) == EXPECTED_SPANS
    assert list(ax_loss.get_lines()[0].get_ydata()) == [r["loss"] for r in rows]
    val = next(x for x in ax_loss.get_lines() if x.get_label() == "validation loss")
    assert list(val.get_xdata()) == [10, 20, 30, 40, 50, 60]
    assert ax_ortho.get_yscale() == "log"
    ortho, zero = ax_ortho.get_lines()
    assert list(ortho.get_xdata()) == [r["step"] for r in rows[1:]]  # step 1 has error 0 (R = I)
    assert list(zero.get_xdata()) == [1] and zero.get_label() == "exactly 0"
    image = imread(save_png(fig, tmp_path / "training.png"))
    assert image.std() > 0.05


def test_plots_command_writes_both_pngs(cfg):
    paths = plots(cfg)
    assert set(paths) == {"phases", "training"}
    for p in paths.values():
        assert p.parent == cfg.run_dir / "reports" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(p).std() > 0.05


def make_plots(cfg) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-f", "pipeline.mk", "plots", f"CONFIG={cfg.source}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MAKEFLAGS": ""})


def test_make_plots_follows_the_metrics(cfg):
    first = make_plots(cfg)
    assert first.returncode == 0, first.stderr
    assert "==> [plots] building reports/phases.png because reports/phases.png does not exist" in first.stdout
    assert all(p.is_file() for p in cfg.plot_paths.values())
    again = make_plots(cfg)
    assert again.returncode == 0 and "==>" not in again.stdout
    write_metrics(cfg.metrics_path, metric_rows(cfg, 20))  # training went on (or started over)
    redo = make_plots(cfg)
    assert redo.returncode == 0 and "because metrics.jsonl changed" in redo.stdout


def test_make_plots_without_metrics_says_so(tmp_path):
    cfg = load_config(fixture_config(tmp_path))
    proc = make_plots(cfg)
    assert proc.returncode != 0
    assert "metrics.jsonl does not exist: no training step logged yet" in proc.stderr
    assert not cfg.reports_dir.exists()
