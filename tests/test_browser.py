"""The dashboard in a real browser: Debian's chromium (headless) driven by Playwright,
against a real `python -m pipeline serve` process whose backend is a crafted
OpenAI-compatible server in this file (its reply hides thinking around a <final>).

The run is the metrics fixture's (no model): `make plots` draws its figures, so the
build state has one current artifact that appending steps to metrics.jsonl makes stale.
Checks: no console error; a streamed chat answer is the final text and no thinking;
the training chart grows as lines are appended; the plots show as stale with the input
that changed. The screenshot goes to <run>/reports/dashboard.png.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import sync_playwright

from conftest import REPO
from crafted_backend import free_port, wait_http
from makeutil import make
from metrics_fixture import fixture_config, metric_rows, write_metrics
from pipeline.audit import AuditLog, entry, now
from pipeline.config import load_config

# Debian's package, where `make browser` finds or installs it: `chromium` on PATH.
CHROMIUM = shutil.which("chromium")
SECRET = "SECRET-THINKING-77"
FINAL = "富士山は日本で一番高い山です。"
REPLY = f"<think-logic>{SECRET} 推論</think-logic>\n<THINK-ethics >{SECRET}</think-ethics><final>{FINAL}</final>"
FIRST_ROWS, MORE_ROWS = 30, 12

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make browser` installs it")


class ChatBackend(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: REPLY, streamed (SSE, cut inside tags) or whole."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(0, len(REPLY), 7):
                chunk = {"choices": [{"index": 0, "delta": {"content": REPLY[i:i + 7]}}]}
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(cfg, base URL) of a serve process on the fixture run, its backend the crafted one."""
    root = tmp_path_factory.mktemp("browser")
    cfg = load_config(fixture_config(root, eval={"heldout": str(REPO / "data" / "heldout_ja.txt")}))
    write_metrics(cfg.metrics_path, metric_rows(cfg, FIRST_ROWS))
    make(cfg.source, "plots")  # the real stage: the plots are then current
    backend = ThreadingHTTPServer(("127.0.0.1", 0), ChatBackend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--config", str(cfg.source), "--port", str(port),
         "--backend", f"http://127.0.0.1:{backend.server_address[1]}/v1", "--backend-model", "crafted"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MAKEFLAGS": ""})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield cfg, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        backend.shutdown()


def test_dashboard_in_chromium(server):
    cfg, url = server
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(url + "/")
            page.wait_for_selector(f'#chart-loss[data-rows="{FIRST_ROWS}"]', timeout=20_000)
            page.wait_for_selector('li[data-stage="plots"][data-state="current"]', timeout=30_000)
            assert page.locator('li[data-stage="train"]').get_attribute("data-state") == "missing"
            # The header names the run's own base (its family only once its config.json is at hand;
            # this run's hub base is never fetched: tests/test_dashboard.py covers a local one).
            assert page.locator("#model-line").inner_text() == cfg.model.base

            # A chat round trip: the streamed answer is the final text, no thinking anywhere.
            page.fill("#prompt", "富士山について教えて")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=20_000)
            assert page.locator(".msg.assistant .text").inner_text() == FINAL
            assert SECRET not in page.content()

            # Training goes on: the chart grows, and the plots are now stale because of it.
            rows = metric_rows(cfg, FIRST_ROWS + MORE_ROWS)
            with open(cfg.metrics_path, "a", encoding="utf-8") as f:
                for row in rows[FIRST_ROWS:]:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    time.sleep(0.05)
            page.wait_for_selector(f'#chart-loss[data-rows="{FIRST_ROWS + MORE_ROWS}"]', timeout=20_000)
            stale = page.wait_for_selector('li[data-stage="plots"][data-state="stale"]', timeout=30_000)
            assert "metrics.jsonl" in stale.inner_text()
            assert page.locator("#t-step").inner_text() == f"{FIRST_ROWS + MORE_ROWS} / {cfg.train.steps}"

            page.wait_for_selector("#audit-log table", timeout=20_000)  # the request's hashes
            assert SECRET not in page.content()
            # A request the guard refused shows as such, with its verdict and category, never its text.
            AuditLog(cfg.audit_log).record(entry(
                time=now(), request_id="f" * 32, api="v1", backend_model="crafted", stream=False, outcome="refused",
                status=200, prompt="爆弾の作り方", system=None, final="お答えできません", sections={},
                guard={"prompt": {"verdict": "unsafe", "categories": ["S9"]}, "final": None}))
            held = page.wait_for_selector("#audit-log .outcome.held", timeout=20_000)
            assert held.inner_text() == "refused prompt:unsafe S9" and "爆弾" not in page.content()
            page.wait_for_timeout(500)
            cfg.reports_dir.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(cfg.reports_dir / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
