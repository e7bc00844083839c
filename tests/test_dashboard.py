"""The dashboard's API (pipeline/dashboard.py) in-process, on a real run folder.

The session's trained tiny model is copied into a run of its own (as test_eval does),
with its stamps and its data source made older than the copies, so Make takes the
data and the checkpoint as current and everything after them as missing. The state
tests then change what Make looks at (a touched data source, a changed config key) and
read the answer of /api/state, which comes from `make -n` itself.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import DEMO_DATA, REPO, small_config, write_config
from pipeline import dashboard
from pipeline.audit import FIELDS
from pipeline.config import load_config
from pipeline.dashboard import dashboard_router
from pipeline.evaluate import build_report
from pipeline.fidelity import Comparison, gate_fused
from pipeline.plan import write_plan

HELDOUT = REPO / "data" / "heldout_ja.txt"


def settle(cfg, source) -> None:
    """Stamps and data source older than every artifact: Make has nothing to redo up to train."""
    write_plan(cfg)
    for path in [*cfg.stamp_dir.iterdir(), source]:
        os.utime(path, (0, 0))


def copy_run(trained_run, cfg) -> None:
    """The trained run's data, checkpoint, metrics and data report, into cfg's run folder."""
    shutil.copytree(trained_run.prepared_dir, cfg.prepared_dir)
    shutil.copytree(trained_run.final_checkpoint, cfg.final_checkpoint)
    shutil.copy2(trained_run.metrics_path, cfg.metrics_path)
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    for report in ("data.json", "data.md"):
        shutil.copy2(trained_run.reports_dir / report, cfg.reports_dir / report)


@pytest.fixture(scope="module")
def run(trained_run, tiny_phi3_dir, tmp_path_factory):
    """(cfg, settings, data source, TestClient of an app holding only the dashboard's routes)."""
    root = tmp_path_factory.mktemp("dashboard")
    source = root / "demo_ja.jsonl"
    shutil.copy(DEMO_DATA, source)
    settings = small_config(tiny_phi3_dir, root / "build", data={"train": str(source)},
                            eval={"heldout": str(HELDOUT)})
    cfg = load_config(write_config(root / "config.yaml", settings))
    copy_run(trained_run, cfg)
    settle(cfg, source)
    app = FastAPI()
    app.include_router(dashboard_router(cfg, cfg.run_dir / "audit" / "think.jsonl"))
    return cfg, settings, source, TestClient(app)


def state(client) -> dict:
    resp = client.get("/api/state")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["error"] is None, body["error"]
    return {a["stage"]: a for a in body["artifacts"]}


def test_state_current_and_missing(run):
    cfg, _, _, client = run
    s = state(client)
    assert list(s) == ["data", "train", "fuse", "convert", "quantize", "modelfile", "ollama", "plots", "eval"]
    assert s["data"]["state"] == "current" and s["train"]["state"] == "current", (s["data"], s["train"])
    assert s["train"]["paths"] == ["checkpoints/final/checkpoint.json"]
    for stage in ("fuse", "convert", "quantize", "modelfile", "ollama", "eval"):
        assert s[stage]["state"] == "missing", s[stage]
    assert s["fuse"]["reason"] == "fused/fusion.json does not exist"
    assert s["plots"]["paths"] == ["reports/phases.png", "reports/training.png"]


def test_state_stale_after_touching_the_data_source(run):
    cfg, _, source, client = run
    os.utime(source, None)
    try:
        s = state(client)
    finally:
        settle(cfg, source)
    assert s["data"]["state"] == "stale", s["data"]
    assert s["data"]["changed"] == [str(source.resolve())]
    # Make would re-run data, so train follows (through the prepared data it then reads).
    assert s["train"]["state"] == "stale" and s["train"]["changed"], s["train"]
    assert s["fuse"]["state"] == "missing"
    assert state(client)["train"]["state"] == "current"


def test_state_follows_the_prepared_data_as_a_real_make_does(run):
    """The data report is newer than the prepared files it kept (the copied run has it so):
    `make -n` alone would announce a training; a real make compares the prepared files' times."""
    cfg, _, source, client = run
    assert cfg.data_report.stat().st_mtime > cfg.prepared_marker.stat().st_mtime
    assert state(client)["train"]["state"] == "current"
    os.utime(cfg.prepared_marker, None)  # as a data stage that changed the examples leaves it
    try:
        s = state(client)
    finally:
        os.utime(cfg.prepared_marker, (0, 0))
    assert s["data"]["state"] == "current"
    assert s["train"]["state"] == "stale" and s["train"]["changed"] == ["data/data.json"], s["train"]


def test_state_stale_after_a_config_change_names_the_stamp(run):
    cfg, settings, source, client = run
    changed = {**settings, "train": {**settings["train"], "lr": settings["train"].get("lr", 1e-4) * 2}}
    write_config(cfg.source, changed)
    try:
        s = state(client)
    finally:
        write_config(cfg.source, settings)
        settle(cfg, source)
    assert s["data"]["state"] == "current"
    assert s["train"]["state"] == "stale" and s["train"]["changed"] == ["stamps/train.stamp"], s["train"]
    assert s["train"]["reason"] == "stamps/train.stamp changed"


def test_state_reports_a_config_make_cannot_use(run):
    cfg, settings, source, client = run
    write_config(cfg.source, {**settings, "train": {**settings["train"], "no_such_key": 1}})
    try:
        body = client.get("/api/state").json()
    finally:
        write_config(cfg.source, settings)
        settle(cfg, source)
    assert body["artifacts"] == [] and "no_such_key" in body["error"], body


def test_metrics_after_n_and_a_half_written_line(run):
    cfg, _, _, client = run
    original = cfg.metrics_path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in original.splitlines()]
    try:
        body = client.get("/api/metrics?after=4").json()
        assert [r["step"] for r in body["rows"]] == [r["step"] for r in rows if r["step"] > 4]
        assert body["last_step"] == rows[-1]["step"] and body["total_steps"] == cfg.train.steps
        assert [p["phase"] for p in body["phases"]] == ["chaos", "transition", "order"]
        assert body["rows"][0] == rows[4]
        line = json.dumps({**rows[-1], "step": rows[-1]["step"] + 1})
        with open(cfg.metrics_path, "a", encoding="utf-8") as f:
            f.write(line[:20])  # training is in the middle of writing this line
        assert client.get(f"/api/metrics?after={rows[-1]['step']}").json()["rows"] == []
        with open(cfg.metrics_path, "a", encoding="utf-8") as f:
            f.write(line[20:] + "\n")
        new = client.get(f"/api/metrics?after={rows[-1]['step']}").json()["rows"]
        assert [r["step"] for r in new] == [rows[-1]["step"] + 1]
        assert client.get("/api/metrics?after=-1").status_code == 422
    finally:
        cfg.metrics_path.write_text(original, encoding="utf-8")


def config_value(cfg, key: str):
    """The setting a dotted key names (fidelity.max_kl_fused); a KeyError for a key the config lacks."""
    value = cfg
    for part in key.split("."):
        if not hasattr(value, part):
            raise KeyError(f"{key}: no such config key ({part!r})")
        value = getattr(value, part)
    return value


def test_config_value_refuses_a_key_the_config_lacks(run):
    cfg = run[0]
    assert config_value(cfg, "fidelity.max_kl_fused") == cfg.fidelity.max_kl_fused
    with pytest.raises(KeyError, match="fidelity.fuse_max_kl"):
        config_value(cfg, "fidelity.fuse_max_kl")


def test_reports_as_their_stages_wrote_them(run):
    cfg, _, _, client = run
    empty = client.get("/api/reports").json()
    assert empty["fidelity"]["data"] is None and empty["eval"]["data"] is None
    # The fuse stage's own writer: its entry names the bound by the config key it was read from.
    gate_fused(cfg, Comparison(kl=1e-9, top1=1.0, max_abs=1e-5, positions=40), "original")
    rows = [{"model": m, "source": m, "runtime": "transformers", "tokens": 10, "nll": 1.0 + i / 10,
             "perplexity": 2.7 + i} for i, m in enumerate(["base", "trained", "fused", "f16", "q4_k_m"])]
    report = build_report(cfg, rows, [[1, 2, 3]])
    cfg.eval_report.write_text(json.dumps(report), encoding="utf-8")
    try:
        body = client.get("/api/reports").json()
        fuse = body["fidelity"]["data"]["fuse"]
        assert fuse["kl"] == 1e-9 and fuse["passed"] is True and body["fidelity"]["error"] is None
        assert fuse["bound_key"] == "fidelity.max_kl_fused"
        assert fuse["bound"] == config_value(cfg, fuse["bound_key"]) == cfg.fidelity.max_kl_fused
        assert body["eval"]["data"] == json.loads(json.dumps(report))
        cfg.eval_report.write_text('{"rows": [', encoding="utf-8")
        broken = client.get("/api/reports").json()["eval"]
        assert broken["data"] is None and broken["error"].startswith("eval.json: not readable JSON")
    finally:
        cfg.eval_report.unlink()
        (cfg.reports_dir / "fidelity.json").unlink()
        (cfg.reports_dir / "fidelity.md").unlink()


def audit_line(i: int) -> str:
    digest = {"sha256": f"{i:064x}", "length": i + 1}
    return json.dumps({"time": "2026-12-02T17:30:00.000Z", "request_id": f"{i:032x}", "api": "v1", "backend_model": "m",
                       "stream": True, "outcome": "ok", "status": 200, "prompt": digest, "system": None,
                       "final": digest, "thinking": {"think-logic": digest}, "guard": None}) + "\n"


def test_audit_tail(run):
    cfg, _, _, client = run
    log = cfg.run_dir / "audit" / "think.jsonl"
    assert client.get("/api/audit?tail=5").json()["entries"] == []
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(audit_line(i) for i in range(1, 6)) + "not json\n" + audit_line(6) + audit_line(7)[:30],
                   encoding="utf-8")
    try:
        body = client.get("/api/audit?tail=3").json()
        # The last three complete lines: 5, the bad line (named, not shown), 6; the half-written 7 waits.
        assert [e["request_id"] for e in body["entries"]] == [f"{5:032x}", f"{6:032x}"]
        assert body["errors"] == ["think.jsonl line 6: not JSON"]
        assert all(set(e) == set(FIELDS) for e in body["entries"])
        with open(log, "a", encoding="utf-8") as f:  # text where a digest belongs: not shown
            f.write("\n" + json.dumps({**json.loads(audit_line(8)), "prompt": "plain text"}) + "\n")
        body = client.get("/api/audit?tail=1").json()
        assert body["entries"] == [] and body["errors"][0].startswith("think.jsonl line 9: prompt")
        assert client.get("/api/audit?tail=0").status_code == 422
    finally:
        log.unlink()


def test_page_and_assets(run):
    client = run[3]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/ui/..%2Fdashboard.py").status_code == 404
    assert client.get("/ui/index.html").status_code == 404  # the page is served at / only
    lib = client.get("/ui/uPlot.iife.min.js")
    assert lib.status_code == 200, "run `make ui`: " + lib.text
    assert b"uPlot" in lib.content[:200]
    # Every script and style the page asks for is served from here: nothing from a CDN.
    for ref in ("/ui/uPlot.iife.min.js", "/ui/uPlot.min.css", "/ui/app.js", "/ui/style.css"):
        assert ref in page.text
    assert "http://" not in page.text and "https://" not in page.text


def test_the_chart_library_comes_from_the_images_folder_when_the_clone_has_none(run, tmp_path, monkeypatch):
    """The CUDA image installs the pinned uPlot outside the clone that `make docker-run` mounts over
    its source, and names that folder in AGIASI_UI_MODULES (docker/Dockerfile)."""
    client = run[3]
    monkeypatch.setattr(dashboard, "NODE_MODULES", tmp_path / "clone" / "node_modules")
    monkeypatch.delenv(dashboard.UI_MODULES_ENV, raising=False)
    missing = client.get("/ui/uPlot.min.css")
    assert missing.status_code == 503 and "make ui" in missing.text
    image = tmp_path / "image" / "node_modules"
    (image / "uplot" / "dist").mkdir(parents=True)
    (image / "uplot" / "dist" / "uPlot.min.css").write_text(".uplot{}", encoding="utf-8")
    monkeypatch.setenv(dashboard.UI_MODULES_ENV, str(image))
    served = client.get("/ui/uPlot.min.css")
    assert served.status_code == 200 and served.text == ".uplot{}"


def test_the_header_names_the_runs_base_and_its_family(run):
    cfg, _, _, client = run
    body = client.get("/api/metrics").json()
    assert body["base"] == cfg.model.base and body["family"] == "Phi-3 / Phi-3.5"
