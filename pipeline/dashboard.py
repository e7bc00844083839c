"""The dashboard: one page that shows a run's training, build state, reports and audit log.

    app.include_router(dashboard_router(cfg, audit_path))   # pipeline/serve.py does this

Routes (all GET, JSON unless said):
- `/`: the page (pipeline/ui/index.html); `/ui/{asset}`: its script and style, and the
  chart library (uPlot) that `make ui` installs from the npm registry, pinned by
  pipeline/ui/package-lock.json, into pipeline/ui/node_modules (never committed). Where
  the clone has none, the node_modules folder named by $AGIASI_UI_MODULES: the CUDA image
  installs the same pinned uPlot there at build (docker/Dockerfile), outside the clone
  `make docker-run` mounts over its source.
- `/api/state`: what Make would build and why, read from Make itself: `make -n -k` on
  pipeline.mk's targets, whose `announce` lines say "building X because Y changed" or
  "because X does not exist". Each artifact of the plan (`<run>/plan.mk`, which that same
  `make` run rewrites) is `stale` (with the inputs that changed), `missing`, or `current`
  when Make would leave it alone. Nothing here judges freshness its own way.
  One catch: `make -n` takes a target with an empty recipe as remade, since it cannot look
  at the file again afterwards as a real make does. The prepared data is one
  (`$(PREPARED): $(DATA_REPORT) ;`): the data stage rewrites its report on every run but
  the prepared files only when the examples change, so a report newer than them would make
  `make -n` announce a training that `make` would not run. When the data stage itself is
  not announced, a second `make -n -o <report>` (the report taken as old, which it then
  is) asks Make again, and Make compares the prepared files' own times.
- `/api/metrics?after=N`: the rows of `<run>/metrics.jsonl` after step N (a half-written
  last line waits for the next poll), with the phase schedule for the chart's shading.
- `/api/reports`: `reports/fidelity.json` and `reports/eval.json` as their stages wrote them.
- `/api/audit?tail=N`: the well-formed entries among the last N lines of the /think audit
  log (hashes and lengths only, checked with audit.entry_problems); other lines are named.

Errors: a file that cannot be read or parsed is reported in the answer (`error`, naming
the file and line), never as a traceback; an unknown asset is a 404.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from . import audit
from .config import Config, base_family
from .monitor import MetricsFollower, phase_spans
from .plan import make_variables

REPO = Path(__file__).resolve().parent.parent
UI_DIR = Path(__file__).resolve().parent / "ui"
# The chart library, as `npm ci` lays it out (pipeline/ui/package.json pins it): the clone's,
# else the one in $AGIASI_UI_MODULES (the CUDA image's).
NODE_MODULES = UI_DIR / "node_modules"
UI_MODULES_ENV = "AGIASI_UI_MODULES"
OWN_ASSETS = {"app.js": UI_DIR / "app.js", "style.css": UI_DIR / "style.css"}
LIBRARY_ASSETS = {"uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js", "uPlot.min.css": "uplot/dist/uPlot.min.css"}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

# pipeline.mk's goals, in the DAG's order, and each stage's artifacts by plan.mk variable.
# QUANTIZED holds one artifact per quantization; PLOTS is one recipe writing both figures.
PLAN_GOALS = ("data", "train", "fuse", "gguf", "modelfile", "ollama", "plots", "eval")
STAGE_ARTIFACTS = (("data", "DATA_REPORT"), ("train", "CHECKPOINT"), ("fuse", "FUSED"),
                   ("convert", "CONVERTED"), ("imatrix", "IMATRIX"), ("quantize", "QUANTIZED"),
                   ("modelfile", "MODELFILE"), ("ollama", "OLLAMA_STAMP"), ("plots", "PLOTS"),
                   ("eval", "EVAL_PASSED"))
GROUPED = {"PLOTS"}
# pipeline.mk's `announce`; `make -n` prints the echo command, quotes included.
ANNOUNCE = re.compile(r'==> \[(?P<stage>[\w-]+)\] building (?P<artifact>\S+) because (?P<why>.*?)"?\s*$')
NO_RULE = re.compile(r"No rule to make target '(?P<input>[^']+)', needed by '(?P<target>[^']+)'")
STATE_TIMEOUT_S = 120
AUDIT_TAIL_MAX = 500


def library_file(relative: str) -> Path:
    """A file of the chart library: the clone's node_modules (`make ui`), else $AGIASI_UI_MODULES's;
    the clone's path when neither has it (the 503 names it)."""
    folders = [NODE_MODULES] + ([Path(os.environ[UI_MODULES_ENV])] if os.environ.get(UI_MODULES_ENV) else [])
    return next((f / relative for f in folders if (f / relative).is_file()), NODE_MODULES / relative)


def dashboard_router(cfg: Config, audit_path: Path) -> APIRouter:
    """The dashboard's routes for the run of `cfg`, with the /think audit log at `audit_path`."""
    router = APIRouter()
    follower = MetricsFollower(cfg.metrics_path)
    follower_lock = threading.Lock()
    state_lock = threading.Lock()

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(UI_DIR / "index.html", media_type="text/html")

    @router.get("/ui/{asset}", include_in_schema=False)
    def ui_asset(asset: str) -> FileResponse:
        path = OWN_ASSETS.get(asset) or (library_file(LIBRARY_ASSETS[asset]) if asset in LIBRARY_ASSETS else None)
        if path is None:
            raise HTTPException(404, f"no dashboard asset {asset!r}")
        if not path.is_file():
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            raise HTTPException(503, f"{shown} is not installed: run `make ui` (npm ci)")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    @router.get("/api/state")
    def api_state() -> dict:
        with state_lock:  # one `make -n` at a time: it rewrites the run's stamps and plan.mk
            return build_state(cfg)

    @router.get("/api/metrics")
    def api_metrics(after: int = Query(0, ge=0)) -> dict:
        with follower_lock:
            follower.poll()
            rows = list(follower.rows)
        family = base_family(cfg)
        return {
            "run": cfg.run.name,
            # The header names the run's base and its family (None while the base is not at hand).
            "base": cfg.model.base,
            "family": family.display if family else None,
            "total_steps": cfg.train.steps,
            "phases": [{"phase": p, "start": s, "end": e} for p, s, e in phase_spans(cfg)],
            "last_step": rows[-1]["step"] if rows else 0,
            "rows": [r for r in rows if r["step"] > after],
        }

    @router.get("/api/reports")
    def api_reports() -> dict:
        # The files fidelity.record and evaluate.evaluate write.
        return {"fidelity": read_json_report(cfg.reports_dir / "fidelity.json"),
                "eval": read_json_report(cfg.eval_report)}

    @router.get("/api/audit")
    def api_audit(tail: int = Query(50, ge=1, le=AUDIT_TAIL_MAX)) -> dict:
        return audit_tail(Path(audit_path), tail)

    return router


# -- the build's state, from Make --------------------------------------------------

def run_make_dry(cfg: Config, *flags: str, goals: tuple[str, ...] = PLAN_GOALS) -> subprocess.CompletedProcess:
    """`make -n -k [flags]` on pipeline.mk for `goals`, as the Makefile calls it (MAKEFLAGS cleared)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    cmd = ["make", "-n", "-k", *flags, "--no-print-directory", "-f", "pipeline.mk", *goals,
           f"CONFIG={cfg.source}", f"PY={sys.executable}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=STATE_TIMEOUT_S)


def build_state(cfg: Config) -> dict:
    """Each artifact of the plan: current, stale (and which inputs changed) or missing.

    Returns {"run", "artifacts": [{"stage", "artifact", "paths", "state", "changed",
    "reason"}], "error"}; `error` holds what Make said when it could not plan at all
    (a bad config), and then `artifacts` is empty.
    """
    try:
        proc = run_make_dry(cfg)
    except subprocess.TimeoutExpired:
        return {"run": cfg.run.name, "artifacts": [], "error": f"make -n took over {STATE_TIMEOUT_S} s"}
    plan_mk = cfg.run_dir / "plan.mk"
    if not plan_mk.is_file() or "is not usable" in proc.stderr:
        return {"run": cfg.run.name, "artifacts": [], "error": (proc.stderr.strip() or proc.stdout.strip())[-2000:]}
    plan = make_variables(cfg)  # what that make run wrote into plan.mk
    run_dir = Path(plan["RUN_DIR"])
    announced = _announced(proc.stdout)
    report, prepared = (_relative(Path(plan[v]), run_dir) for v in ("DATA_REPORT", "PREPARED"))
    if report not in announced and any(prepared in why.split() for why in announced.values()):
        # The data stage will not run, so the prepared data stays as it is (see the module's doc).
        proc = run_make_dry(cfg, "-o", plan["DATA_REPORT"])
        announced = _announced(proc.stdout)
    blocked = {m["target"]: m["input"] for m in NO_RULE.finditer(proc.stderr)}
    artifacts = []
    for stage, var in STAGE_ARTIFACTS:
        paths = plan.get(var, "").split()
        groups = [paths] if var in GROUPED else [[p] for p in paths]
        for group in groups:
            artifacts.append(_artifact_state(stage, [Path(p) for p in group], run_dir, announced, blocked))
    return {"run": plan.get("RUN_NAME", cfg.run.name), "artifacts": artifacts, "error": None}


def _announced(make_output: str) -> dict[str, str]:
    """artifact (as announce names it) -> why, from pipeline.mk's announce lines."""
    return {m["artifact"]: m["why"] for m in map(ANNOUNCE.search, make_output.splitlines()) if m}


def _relative(path: Path, run_dir: Path) -> str:
    """A path as pipeline.mk's announce names it: relative to the run folder when inside it."""
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _artifact_state(stage: str, paths: list[Path], run_dir: Path, announced: dict[str, str],
                    blocked: dict[str, str]) -> dict:
    names = [_relative(p, run_dir) for p in paths]
    row = {"stage": stage, "artifact": ", ".join(names), "paths": names, "changed": [], "reason": ""}
    why = next((announced[n] for n in names if n in announced), None)
    if why is not None:
        if why.endswith(" does not exist"):
            row.update(state="missing", reason=why)
        else:
            changed = why.removesuffix(" changed").split()
            row.update(state="stale", changed=changed,
                       reason=f"{' '.join(changed)} changed" if changed else "an input will be rebuilt")
        return row
    if all((REPO / p).exists() for p in paths):  # plan.mk names files inside the project relative to it
        row["state"] = "current"
        return row
    block = next((blocked[str(p)] for p in paths if str(p) in blocked), None)
    row.update(state="missing", reason=f"cannot be built: {_relative(Path(block), run_dir)} does not exist"
               if block else "does not exist")
    return row


# -- reports and the audit log --------------------------------------------------------

def read_json_report(path: Path) -> dict:
    """{"path", "data"} of a JSON report; data is None (with `error`) when absent or unreadable."""
    try:
        return {"path": path.name, "data": json.loads(path.read_text(encoding="utf-8")), "error": None}
    except FileNotFoundError:
        return {"path": path.name, "data": None, "error": None}
    except (OSError, ValueError) as e:
        return {"path": path.name, "data": None, "error": f"{path.name}: not readable JSON ({e})"}


def audit_tail(path: Path, tail: int) -> dict:
    """The well-formed entries among the last `tail` complete lines of the audit log.

    A line that is not an entry (audit.entry_problems: other fields, text where a digest
    belongs) never reaches the page; `errors` names it by line number. A last line without
    its newline is still being written and waits for the next call.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            last = deque(enumerate(f, start=1), maxlen=tail + 1)
    except FileNotFoundError:
        return {"path": path.name, "entries": [], "errors": []}
    if last and not last[-1][1].endswith("\n"):
        last.pop()
    elif len(last) > tail:
        last.popleft()
    entries, errors = [], []
    for number, line in last:
        try:
            obj = json.loads(line)
            problems = audit.entry_problems(obj)
        except ValueError:
            problems = ["not JSON"]
        if problems:
            errors.append(f"{path.name} line {number}: {problems[0]}")
        else:
            entries.append(obj)
    return {"path": path.name, "entries": entries, "errors": errors}
