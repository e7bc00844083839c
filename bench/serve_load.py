"""`make serve` under load: N concurrent streamed /v1 clients against a backend that streams at a fixed rate.

    .venv/bin/python bench/serve_load.py            # N = 1, 2, 4, 8, 16, 32, 64; ~3 min on 2 cores
    .venv/bin/python bench/serve_load.py --smoke    # N = 1, 4, a short reply: what the test suite runs

Three processes, as in use: the paced backend (this file with --backend-only: an OpenAI-compatible
/v1 that streams a reply of `--think` thinking tokens then `--final` answer tokens, one SSE event
every 1/--rate s, for every request at once), the real `python -m pipeline serve` in front of it,
and the clients (httpx, asyncio, in this process). For each N, N clients each send --requests
streamed chat completions one after another, first straight to the backend (the client runs the
same thinking filter itself), then through `pipeline serve`. Printed per N:

  throughput      completed requests per second through serve
  first byte      p50 / p99 seconds from sending the request to the first byte of the final's
                  text, through serve and direct; overhead = serve p50 - direct p50

Then the limits: a second `pipeline serve` with serve.max_concurrent = M gets M - 1, M and 2M
requests at once; exactly the ones past M must be 429 (with Retry-After), none below. Last, the
audit log: `pipeline audit verify` must count exactly one well-formed line per request sent to
either server, 429s included.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx2  # noqa: E402
import uvicorn  # noqa: E402
import yaml  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from pipeline.audit import verify  # noqa: E402
from pipeline.thinking import ThinkingFilter  # noqa: E402

MODEL = "bench"


# -- the paced backend (its own process) ------------------------------------------------------------

def backend_main(port: int, rate: float, think: int, final: int) -> None:
    app = FastAPI()
    pieces = ["<think-logic>"] + ["考え "] * think + ["</think-logic><final>"] + ["答え "] * final + ["</final>"]

    async def events():
        for piece in pieces:
            await asyncio.sleep(1 / rate)
            yield "data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}, ensure_ascii=False) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- processes ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx2.get(url, timeout=1)
            return
        except httpx2.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"{url} did not come up")


def start_backend(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--backend-only", "--port", str(port), "--rate", str(args.rate),
                             "--think", str(args.think), "--final", str(args.final)])
    wait_up(f"http://127.0.0.1:{port}/", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_serve(work: Path, name: str, backend: str, max_concurrent: int) -> tuple[subprocess.Popen, str, Path]:
    # What serve reads: the run's folder (its audit log) and the serve section; the base is never loaded.
    cfg = {"run": {"name": name, "build_dir": str(work / "build")}, "model": {"base": "example/not-fetched"},
           "data": {"train": str(REPO / "data" / "demo_ja.jsonl")},
           "serve": {"max_concurrent": max_concurrent, "backend_timeout": 60}}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--config", str(config), "--port", str(port),
                             "--backend", backend, "--backend-model", MODEL], cwd=REPO,
                            env={k: v for k, v in os.environ.items() if k != "AGIASI_SERVE_TOKEN"},
                            stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_up(base + "/healthz", proc)
    return proc, base + "/v1", work / "build" / name / "audit" / "think.jsonl"


# -- the clients -------------------------------------------------------------------------------------

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "考えてから答えて"}], "stream": True}


async def one_request(client: httpx2.AsyncClient, url: str, direct: bool) -> tuple[int, float | None]:
    """(status, seconds to the first byte of the final's text)."""
    started, first = time.perf_counter(), None
    filt = ThinkingFilter()
    async with client.stream("POST", url + "/chat/completions", json=BODY) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        async for event in httpx2.EventSource(r):
            if event.data.strip() == "[DONE]":
                break
            obj = json.loads(event.data)
            if "error" in obj:
                raise SystemExit(f"an error event: {obj}")
            content = (obj["choices"][0]["delta"].get("content") or "") if obj["choices"] else ""
            text = filt.feed(content) if direct else content
            if text and first is None:
                first = time.perf_counter() - started
    return 200, first


async def clients(url: str, n: int, per_client: int, direct: bool) -> tuple[list[float], float]:
    """N clients, each `per_client` streamed requests in a row: first-byte times, wall seconds."""
    limits = httpx2.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as client:
        async def one_client():
            out = []
            for _ in range(per_client):
                status, first = await one_request(client, url, direct)
                if status != 200 or first is None:
                    raise SystemExit(f"request failed: HTTP {status}")
                out.append(first)
            return out
        started = time.perf_counter()
        results = await asyncio.gather(*[one_client() for _ in range(n)])
        return [x for r in results for x in r], time.perf_counter() - started


async def burst(url: str, n: int) -> list[tuple[int, str | None]]:
    """n requests at once: (status, Retry-After) each."""
    limits = httpx2.Limits(max_connections=n + 4)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as client:
        async def one():
            async with client.stream("POST", url + "/chat/completions", json=BODY) as r:
                await r.aread()
                return r.status_code, r.headers.get("retry-after")
        return await asyncio.gather(*[one() for _ in range(n)])


def settled_lines(log: Path, expected: int, seconds: float = 5.0) -> int:
    """verify()'s count once `expected` lines are there (a stream's line is written just after its
    last byte), or whatever is there after `seconds`."""
    deadline = time.monotonic() + seconds
    while (count := verify(log)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="N = 1 and 4, short replies: checks the benchmark runs")
    ap.add_argument("--rate", type=float, default=50.0, help="backend events per second per request")
    ap.add_argument("--think", type=int, default=40, help="thinking tokens per reply")
    ap.add_argument("--final", type=int, default=10, help="answer tokens per reply")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-concurrent", type=int, default=8, help="M of the limit check")
    ap.add_argument("--backend-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend_only:
        backend_main(args.port, args.rate, args.think, args.final)
        return 0
    levels = (1, 2, 4, 8, 16, 32, 64)
    if args.smoke:
        levels, args.rate, args.think, args.final, args.requests, args.max_concurrent = (1, 4), 200.0, 8, 4, 2, 3
    sent = 0
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            backend, backend_url = start_backend(args)
            procs.append(backend)
            serve, serve_url, log = start_serve(work, "load", backend_url, max(levels))
            procs.append(serve)
            limited, limited_url, limited_log = start_serve(work, "limited", backend_url, args.max_concurrent)
            procs.append(limited)
            print(f"backend: {args.rate:g} events/s per request, {args.think} thinking + {args.final} answer "
                  f"tokens ({(args.think + args.final + 2) / args.rate:.2f} s a reply); {args.requests} requests "
                  "per client")
            print(f"{'N':>3} {'throughput':>12} {'first byte p50':>15} {'p99':>7} {'direct p50':>11} {'p99':>7} "
                  f"{'overhead p50':>13}")
            for n in levels:
                direct, _ = asyncio.run(clients(backend_url, n, args.requests, direct=True))
                through, wall = asyncio.run(clients(serve_url, n, args.requests, direct=False))
                sent += n * args.requests
                print(f"{n:>3} {len(through) / wall:>8.2f} r/s {p(through, 50):>13.3f} s {p(through, 99):>6.3f} "
                      f"{p(direct, 50):>10.3f} {p(direct, 99):>6.3f} {p(through, 50) - p(direct, 50):>+11.3f} s")
            m = args.max_concurrent
            limit_ok = True
            for n in (m - 1, m, 2 * m):
                answers = asyncio.run(burst(limited_url, n))
                busy = [a for a in answers if a[0] == 429]
                expected = max(0, n - m)
                good = len(busy) == expected and all(a[1] == "1" for a in busy) and \
                    all(a[0] == 200 for a in answers if a[0] != 429)
                limit_ok &= good
                print(f"max_concurrent {m}, {n} at once: {len(busy)} answered 429 (expected {expected}) "
                      f"{'ok' if good else 'WRONG'}")
            burst_sent = (m - 1) + m + 2 * m
            lines = settled_lines(log, sent)
            limited_lines = settled_lines(limited_log, burst_sent)
            audit_ok = lines == sent and limited_lines == burst_sent
            print(f"audit lines: {lines} for {sent} requests, {limited_lines} for {burst_sent} (429s included), "
                  f"all well-formed {'ok' if audit_ok else 'WRONG'}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    return 0 if limit_ok and audit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
