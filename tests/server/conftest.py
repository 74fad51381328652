"""Server test fixtures: a tiny random GAM + a byte-level BPE tokenizer trained on a committed WikiText-2 excerpt,
saved as a real checkpoint directory; apps driven in-process (httpx ASGITransport) or by a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from bench.common import listening_port
from gam_model import data
from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.tokenizer import Tokenizer
from server.app import create_app
from server.settings import Settings
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_TEXT = Path(__file__).resolve().parent.parent / "fixtures" / "wikitext2_train_excerpt.txt"
MODEL_ID = "tiny-gam"
EOS_ID = 0  # the fixture tokenizer's eos (train_tokenizer; checked in checkpoint_dir)
# OpenAI logit_bias that keeps a sampled request from ever drawing eos: the trained tiny model still gives it about
# 1e-5 per token, so a request that must hold its slot (or reach its length) could otherwise end early by chance
NO_EOS = {str(EOS_ID): -100}


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """The project's byte-level BPE (any Unicode input round-trips) trained on the WikiText-2 excerpt; id 0 is eos."""
    return data.train_tokenizer([FIXTURE_TEXT], "bytelevel", vocab_size=vocab_size)


def fit(model: torch.nn.Module, ids: list[int], block: int, steps: int = 120, seed: int = 0) -> None:
    """A few AdamW steps of next-token training, so the tiny model's distributions are peaked like a real one's."""
    data = torch.tensor(ids)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (16,), generator=gen)
        x = torch.stack([data[i : i + block] for i in starts.tolist()])  # (B, T)
        y = torch.stack([data[i + 1 : i + block + 1] for i in starts.tolist()])  # (B, T)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory (config.json, model.safetensors, tokenizer.json) of a tiny GAM briefly trained on
    the WikiText-2 excerpt (block_size 48, so generations cross into the sliding-window regime)."""
    tok = train_tokenizer()
    assert tok.eos_token_id == EOS_ID
    model = tiny_model(seed=3, vocab_size=tok.vocab_size, block_size=48)
    fit(model, tok.encode(FIXTURE_TEXT.read_text()), block=48)
    d = tmp_path_factory.mktemp("ckpt") / MODEL_ID
    save_checkpoint(d, model, tok, CheckpointMeta(model_name=MODEL_ID, eos_token_id=tok.eos_token_id))
    return d


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


def tiny_settings(model: Path, **kw: Any) -> Settings:
    """Settings the server tests share for a tiny checkpoint on CPU in fp32; keyword arguments override them."""
    base: dict[str, Any] = dict(
        model=model,
        device="cpu",
        dtype="float32",
        max_batch_size=4,
        max_queue=16,
        max_new_tokens=64,
        max_input_tokens=256,
        request_timeout=60.0,
    )
    return Settings.model_validate(base | kw)


@pytest.fixture
def make_settings(checkpoint_dir: Path):
    """Settings for the tiny checkpoint on CPU, overridable per test."""
    return lambda **kw: tiny_settings(checkpoint_dir, **kw)


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield app, client


@pytest.fixture
async def client(make_settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings()) as (_, c):
        yield c


class LiveServer:
    """A real uvicorn on 127.0.0.1 at a free port, in a background thread. uvicorn serves on the socket bound here, so
    the port is never released; without SO_REUSEADDR, as another socket with it could bind the same port until uvicorn
    listens (Linux allows that while neither listens)."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=settings.timeout_keep_alive
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def engine(self):
        return self.app.state.engine


@pytest.fixture
def live_server(make_settings) -> Iterator[LiveServer]:
    with LiveServer(make_settings()) as s:
        yield s


class GamServe:
    """A real `gam-serve` process (python -m server.cli) on 127.0.0.1, killed on exit if still running; its combined
    output is `.log` afterwards. It runs with --port 0: the kernel picks a free port for the server's own socket (a
    port picked free here and passed on could be taken by another process before the server binds it); `port` and
    `url` are set once entered, when the server listens."""

    def __init__(self, model: Path, *args: str, **env: str) -> None:
        self.cmd = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", "0", *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "GAM_DEVICE": "cpu", **env}
        self.port = 0
        self.url = ""
        self.log = ""

    def __enter__(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # the pipe is read as the server writes: unread, it fills (64 KiB: some 900 access-log lines) and the server
        # blocks in its next log write, mid-request
        self._output: list[bytes] = []
        self._reader = threading.Thread(target=self._read_output, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        try:  # __exit__ does not run when __enter__ raises: whatever stops the wait, the server must not run on
            port = listening_port(self.proc, 120)
        except BaseException:
            self.__exit__()
            raise
        if port is None:
            self.__exit__()
            raise AssertionError(f"gam-serve did not start: {self.log[-3000:]}")
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        return self.proc

    def _read_output(self, out: IO[bytes]) -> None:
        for chunk in iter(lambda: out.read1(1 << 16), b""):  # type: ignore[attr-defined]  # a BufferedReader
            self._output.append(chunk)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(30)  # the pipe's end: every process holding it has exited (bounded: a stray child)
        self.log = b"".join(self._output).decode(errors="replace")

    async def wait_healthy(self, client: httpx.AsyncClient) -> None:
        """Poll /health until 200 (the process must stay up; bounded)."""
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, "gam-serve did not start"
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)

    async def wait_frontends(self, n: int) -> None:
        """Until each of the n frontends (--api-server-count n) has answered a /metrics scrape (it names itself in
        gam_frontend_process_*): a worker listens once its own startup is over, seconds after another may (bounded)."""
        seen: set[int] = set()
        no_reuse = httpx.Limits(max_keepalive_connections=0)  # a new connection per scrape: any worker may take it
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=no_reuse) as c:
            for _ in range(1200):
                text = (await c.get("/metrics")).text
                seen |= {i for i in range(n) if f'gam_frontend_process_cpu_seconds_total{{frontend="{i}"}}' in text}
                if len(seen) == n:
                    return
                await asyncio.sleep(0.05)
        raise AssertionError(f"only frontend(s) {sorted(seen)} of {n} answered")


class SlowClient:
    """An HTTP client that calls the app directly (ASGI), so each send is seen as the app made it (httpx's in-process
    transport joins a response's sends); body sends number `hold` (1-based) wait until released, as uvicorn's send
    waits while the socket's buffer is full."""

    def __init__(self, hold: set[int] | None = None, leave_after: int | None = None) -> None:
        self.hold = hold or set()
        self.leave_after = leave_after  # the client disconnects once this many body sends were made
        self.status: int | None = None
        self.bodies: list[bytes] = []
        self.ended = False
        self.waiting = asyncio.Event()  # a send is waiting now
        self.release = asyncio.Event()
        self.left = asyncio.Event()

    async def run(self, app: ASGIApp, path: str, body: dict) -> None:
        raw = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
        first = [{"type": "http.request", "body": raw, "more_body": False}]
        done = asyncio.Event()

        async def receive() -> dict:
            if first:
                return first.pop()
            stop = asyncio.ensure_future(done.wait())
            leave = asyncio.ensure_future(self.left.wait())
            await asyncio.wait([stop, leave], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel(), leave.cancel()
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                self.status = msg["status"]
            if msg["type"] != "http.response.body":
                return
            assert not self.ended, "a send after the end of the body"
            n = len(self.bodies) + 1
            if n in self.hold:
                self.waiting.set()
                await self.release.wait()
            self.bodies.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                self.ended = True
                done.set()
            if self.leave_after is not None and n >= self.leave_after:
                self.left.set()

        await app(scope, receive, send)

    def events(self) -> list[str]:
        text = b"".join(self.bodies).decode()
        return [b[len("data: ") :] for b in text.split("\n\n") if b]
