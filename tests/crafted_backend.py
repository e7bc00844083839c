"""A crafted OpenAI-compatible backend for the serving tests: it replies with whatever a test
sets (hostile replies included), as JSON or SSE, and records what it was asked and whether a
stream was cut off; or, as a classifier, a verdict on what it was sent. uvicorn in a thread, on a free loopback port."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from makeutil import needs_llama_cpp
from pipeline import llamacpp

SECRET = "θψΩ秘密"
# Replies built from these pieces hold SECRET only as thinking (the final and outside text are other
# words; an unclosed final streams its text before the error, which is final text, not thinking).
HOSTILE_PIECES = (
    f"<think>{SECRET}", "</think>", f"<THINK-a >{SECRET}</think-a>", "<final>", "</final>", "ok ", "sure ",
    "< final >", "<thinking>", f"<final>ok<think>{SECRET}", "</ Final>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        try:
            if httpx2.get(url, timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


@contextmanager
def tiny_llama_server(model_dir: Path, work: Path, *args: str) -> Iterator[str]:
    """The real llama-server (the pinned build) on an f16 GGUF of the HF model in model_dir,
    with `args` added; yields its /v1 base URL and stops it after."""
    needs_llama_cpp()
    gguf = llamacpp.convert_hf_to_gguf(model_dir, work / "tiny-f16.gguf", "f16")
    port = free_port()
    proc = subprocess.Popen([str(llamacpp.tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "512", "-t", "2", "--no-webui", "--temp", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


class Backend:
    """Replies with `content` (and `fields`), as JSON or as SSE in `chunk`-character pieces;
    `status` other than 200 answers that (its body holds SECRET); `delay` waits first; `stall`
    waits between streamed pieces; `usage` is sent as OpenAI's usage (streamed: in a last chunk
    with no choices, when asked with stream_options.include_usage). `cut` counts streams that
    the other side closed before their end. `reply`, when set, makes the content of each answer
    from the request's body (a classifier's verdict on the turns it was sent)."""

    def __init__(self):
        self.reset()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            await asyncio.sleep(self.delay)
            if self.reply is not None:
                self.content = self.reply(body)
            if self.status != 200:
                return JSONResponse({"error": {"message": SECRET}}, status_code=self.status)
            if not body.get("stream"):
                return {"choices": [{"message": {"role": "assistant", "content": self.content, **self.fields}}],
                        **({"usage": self.usage} if self.usage else {})}
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(with_usage), media_type="text/event-stream")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def reset(self) -> None:
        self.content, self.fields, self.chunk, self.status, self.delay = "<final>ok</final>", {}, 3, 200, 0.0
        self.stall, self.usage, self.cut, self.reply = 0.0, None, 0, None
        self.requests: list[dict] = []

    async def _events(self, with_usage: bool):
        finished = False
        try:
            for name, text in self.fields.items():
                yield f"data: {json.dumps({'choices': [{'delta': {name: text}}]})}\n\n"
            for i in range(0, len(self.content), self.chunk):
                if i:
                    await asyncio.sleep(self.stall)
                yield f"data: {json.dumps({'choices': [{'delta': {'content': self.content[i:i + self.chunk]}}]})}\n\n"
            if with_usage and self.usage:
                yield f"data: {json.dumps({'choices': [], 'usage': self.usage})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.cut += 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Backend:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
