"""Figures of a training run, from `<run>/metrics.jsonl`, into `<run>/reports/`.

    make plots [CONFIG=config.yaml]
    python -m pipeline plots --config demo.yaml

phases.png   alpha (top) and gate = sigmoid(alpha) (bottom) against step, the
             chaos / transition / order phases of the soul schedule shaded
             and named: the seeds' phase-transition chart.
training.png loss and validation loss (top) and the soul's orthogonality error ||R^T R - I||
             (bottom, log scale) against step, phases shaded.

Works on a finished run and on one still training (the figures then end at
the last logged step). matplotlib runs headless (Agg); each PNG is written
under a temporary name and renamed.
"""
from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_file
from .config import Config
from .errors import BadInputError
from .monitor import MetricsFollower, phase_spans
from .soul import sigmoid

PHASE_COLORS = {"chaos": "#d62728", "transition": "#ff9f1c", "order": "#1f77b4"}
PHASE_TEXT = {"chaos": "#b01e1e", "transition": "#b86200", "order": "#17548a"}
PHASE_ALPHA = 0.15  # shading opacity: the lines stay readable on top
DPI = 110


def read_rows(cfg: Config) -> list[dict]:
    """The complete rows of metrics.jsonl; BadInputError when there are none."""
    follower = MetricsFollower(cfg.metrics_path)
    follower.poll()
    if not follower.rows:
        raise BadInputError(f"{cfg.metrics_path}: no training steps logged yet; run `make train` first")
    return follower.rows


def _shade_phases(ax, cfg: Config, *, label: bool) -> None:
    for name, start, end in phase_spans(cfg):
        ax.axvspan(start, end, color=PHASE_COLORS[name], alpha=PHASE_ALPHA, lw=0, label=f"_phase:{name}")
        if label:
            ax.text((start + end) / 2, 1.02, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=9, color=PHASE_TEXT[name], fontweight="bold")
    ax.set_xlim(0, cfg.train.steps)
    ax.grid(True, alpha=0.3)


def phase_figure(rows: list[dict], cfg: Config):
    """alpha and gate against step, phases shaded; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    s = cfg.soul
    fig = Figure(figsize=(8, 5.5), dpi=DPI, layout="constrained")
    ax_alpha, ax_gate = fig.subplots(2, 1, sharex=True)
    _shade_phases(ax_alpha, cfg, label=True)
    _shade_phases(ax_gate, cfg, label=False)
    ax_alpha.plot(steps, [r["alpha"] for r in rows], color="#222222", lw=1.8, label="alpha")
    ax_alpha.axhline(s.alpha_target, color="#2a7d2e", ls="--", lw=1, label=f"target {s.alpha_target:g} (golden ratio)")
    ax_alpha.set_ylabel("alpha")
    ax_alpha.legend(loc="center left", fontsize=8)
    ax_gate.plot(steps, [r["gate"] for r in rows], color="#7b3fa0", lw=1.8, label="gate = sigmoid(alpha)")
    ax_gate.axhline(sigmoid(s.alpha_target), color="#2a7d2e", ls="--", lw=1,
                    label=f"target {sigmoid(s.alpha_target):.3f}")
    ax_gate.set_ylim(0, 1)
    ax_gate.set_ylabel("gate")
    ax_gate.set_xlabel("step")
    ax_gate.legend(loc="center left", fontsize=8)
    fig.suptitle(f"{cfg.run.name}: soul phase transition (chaos -> transition -> order)")
    return fig


def training_figure(rows: list[dict], cfg: Config):
    """loss and orthogonality error against step, phases shaded; returns the Figure."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(8, 5.5), dpi=DPI, layout="constrained")
    ax_loss, ax_ortho = fig.subplots(2, 1, sharex=True)
    _shade_phases(ax_loss, cfg, label=True)
    _shade_phases(ax_ortho, cfg, label=False)
    ax_loss.plot(steps, [r["loss"] for r in rows], color="#222222", lw=1.5, label="loss")
    if any(r["lm_loss"] != r["loss"] for r in rows):  # differs only with soul.ortho_weight
        ax_loss.plot(steps, [r["lm_loss"] for r in rows], color="#4c78a8", lw=1, ls="--", label="LM loss")
    evaluated = [r for r in rows if r.get("val_loss") is not None]  # every train.eval_every steps
    if evaluated:
        ax_loss.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", color="#2a9d8f",
                     lw=1.2, ms=4, label="validation loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    # A log axis cannot show 0 (R = I exactly, as at the first step): those
    # steps are marked at the bottom instead of cutting the line.
    positive = [(r["step"], r["ortho_error"]) for r in rows if r["ortho_error"] > 0]
    zeros = [r["step"] for r in rows if r["ortho_error"] <= 0]
    if positive:
        ax_ortho.plot(*zip(*positive), color="#c2410c", lw=1.5, label="||R^T R - I||")
    ax_ortho.set_yscale("log")
    if zeros:
        bottom = min(e for _, e in positive) / 10 if positive else 1e-12
        ax_ortho.plot(zeros, [bottom] * len(zeros), "v", color="#c2410c", ms=5, label="exactly 0")
    ax_ortho.set_ylabel("orthogonality error")
    ax_ortho.set_xlabel("step")
    ax_ortho.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{cfg.run.name}: training loss and soul orthogonality")
    return fig


def save_png(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def plots(cfg: Config) -> dict[str, Path]:
    """Write reports/phases.png and reports/training.png; returns {name: path}."""
    rows = read_rows(cfg)
    paths = cfg.plot_paths
    save_png(phase_figure(rows, cfg), paths["phases"])
    save_png(training_figure(rows, cfg), paths["training"])
    last = rows[-1]
    print(f"[plots] {len(rows)} steps (last {last['step']} of {cfg.train.steps}) -> "
          + ", ".join(str(p) for p in paths.values()))
    return paths
