"""Drive load: closed loop (N concurrent streams) or open loop (Poisson / gamma arrivals), bounded in count and time."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
from tqdm import tqdm

from load_tests import protocols
from load_tests.client import HttpxClient
from load_tests.metrics import RequestRecord
from load_tests.prompts import DEFAULT_PROMPTS, PromptSampler
from load_tests.rawclient import RawClient

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (it comes with uvicorn[standard], as the server uses it): the load
    generator shares the machine's CPU with the server it measures, and uvloop's loop costs it less per event."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if not hasattr(asyncio, "Runner"):  # Python 3.10 (supported): asyncio's own loop
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


CLIENTS = ("httpx", "raw")  # LoadConfig.client: HttpxClient (any server) or RawClient (lean, http:// only)


class RemoteTargetError(ValueError):
    """The target is not a loopback address and --allow-remote was not given."""


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse any host but localhost, 127.0.0.0/8 and ::1 unless allow_remote."""
    host = urlsplit(url).hostname
    if host is None:
        raise ValueError(f"no host in URL {url!r}")
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name other than localhost: refused rather than resolved
    if not loopback:
        raise RemoteTargetError(f"refusing to load {host}: only loopback targets unless --allow-remote")


@dataclass
class LoadConfig:
    """One load run. Open loop uses rate/burstiness (concurrency caps requests in flight, 0 = no cap)."""

    url: str = "http://127.0.0.1:8000"
    api: str = "tgi"
    mode: str = "closed"  # "closed" | "open"
    concurrency: int = 8
    rate: float = 1.0  # requests/s (open loop)
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 more uniform (vLLM's definition)
    num_requests: int = 100
    duration_s: float = 60.0  # no request is sent after this
    drain_s: float = 30.0  # in-flight requests get this long past duration_s, then are cancelled
    timeout_s: float = 120.0  # per request
    input_words: int = 64
    output_tokens: int = 64
    disconnect_fraction: float = 0.0  # share of requests cut after a random number of tokens
    disconnect_within: int | None = None  # the cut comes within this many tokens (default: the output length)
    temperature: float = 0.0
    ignore_eos: bool = False
    model: str | None = None
    api_key: str | None = None
    seed: int = 0
    prompts: Path = field(default_factory=lambda: DEFAULT_PROMPTS)
    client: str = "httpx"  # "raw": load_tests/rawclient.py, a few times less CPU per token (http:// only)
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body (e.g. logit_bias)

    def validate(self) -> None:
        if self.api not in protocols.APIS:
            raise ValueError(f"api must be one of {', '.join(protocols.APIS)}")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}")
        if self.mode not in ("closed", "open"):
            raise ValueError("mode must be closed or open")
        if self.num_requests < 1 or self.duration_s <= 0 or self.output_tokens < 1 or self.input_words < 1:
            raise ValueError("num_requests, duration, output and input lengths must be positive")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")
        if self.mode == "open" and (self.rate <= 0 or self.burstiness <= 0):
            raise ValueError("open loop needs rate > 0 and burstiness > 0")
        if not 0.0 <= self.disconnect_fraction <= 1.0:
            raise ValueError("disconnect fraction must be in [0, 1]")
        if self.disconnect_within is not None and self.disconnect_within < 1:
            raise ValueError("disconnect-within must be >= 1 token")


@dataclass
class RunResult:
    """Records of every request sent, and the run's wall-clock bounds (perf_counter seconds)."""

    config: LoadConfig
    records: list[RequestRecord]
    t0: float
    t1: float

    @property
    def duration_s(self) -> float:
        return self.t1 - self.t0


async def sleep_until(t: float) -> None:
    """Sleep until time.perf_counter() >= t. One asyncio.sleep can end early: uvloop's timers (libuv) count whole
    milliseconds of a cached loop clock, so a 30 ms sleep may return after 29.x ms. The loop sleeps again for any rest.
    A time already past still yields once to the event loop: an open loop that is behind (a burst) lets the requests
    it created start, and the streams being read get their chunks, while it catches up."""
    await asyncio.sleep(max(0.0, t - time.perf_counter()))
    while (rest := t - time.perf_counter()) > 0:
        await asyncio.sleep(rest)


def intervals(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Gaps between arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate (Poisson at 1)."""
    theta = 1.0 / (rate * burstiness)
    while True:
        yield float(rng.gamma(shape=burstiness, scale=theta))


Client = HttpxClient | RawClient


class _Load:
    def __init__(self, cfg: LoadConfig, progress: bool) -> None:
        cfg.validate()
        self.cfg = cfg
        self.sampler = PromptSampler(cfg.prompts, seed=cfg.seed)
        self.rng = random.Random(cfg.seed + 1)
        self.path = protocols.APIS[cfg.api]
        self.records: list[RequestRecord] = []
        self.bar = tqdm(total=cfg.num_requests, desc=f"{cfg.mode} {cfg.api}", unit="req", disable=not progress)

    def _next(self) -> tuple[dict, RequestRecord, int | None]:
        cfg = self.cfg
        cut = None
        if cfg.disconnect_fraction and self.rng.random() < cfg.disconnect_fraction:
            cut = self.rng.randint(1, max(1, min(cfg.output_tokens - 1, cfg.disconnect_within or cfg.output_tokens)))
        seed = self.rng.randrange(2**31) if cfg.temperature > 0 else None
        body = protocols.body(
            cfg.api,
            self.sampler.sample(cfg.input_words),
            cfg.output_tokens,
            model=cfg.model,
            temperature=cfg.temperature,
            seed=seed,
            ignore_eos=cfg.ignore_eos,
        )
        body.update(cfg.extra_body)
        rec = RequestRecord(start=0.0, prompt_words=cfg.input_words, max_tokens=cfg.output_tokens)
        self.records.append(rec)
        return body, rec, cut

    async def _one(
        self, client: Client, body: dict, rec: RequestRecord, cut: int | None, start: float | None = None
    ) -> None:
        rec.start = time.perf_counter() if start is None else start
        try:
            await asyncio.wait_for(client.stream(self.cfg.api, self.path, body, rec, cut), self.cfg.timeout_s)
        except TimeoutError:
            rec.error, rec.end = "timeout", time.perf_counter()
        except asyncio.CancelledError:
            rec.error, rec.end = "cancelled_at_deadline", time.perf_counter()
            raise
        finally:
            self.bar.update(1)

    async def _closed(self, client: Client, deadline: float) -> None:
        async def worker() -> None:
            # the time checked against the deadline is the request's start: none starts after the duration
            while len(self.records) < self.cfg.num_requests and (start := time.perf_counter()) < deadline:
                await self._one(client, *self._next(), start=start)

        await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))

    async def _open(self, client: Client, deadline: float) -> list[asyncio.Task]:
        cfg = self.cfg
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency > 0 else None
        gaps = intervals(cfg.rate, cfg.burstiness, np.random.default_rng(cfg.seed))
        tasks: list[asyncio.Task] = []

        async def limited(args: tuple) -> None:
            if sem is None:
                return await self._one(client, *args)
            async with sem:
                return await self._one(client, *args)

        due = time.perf_counter()
        for _ in range(cfg.num_requests):
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(limited(self._next())))
            due += next(gaps)  # absolute schedule: a late wake-up does not push every later arrival back
            await sleep_until(due)
        return tasks

    async def run(self) -> RunResult:
        cfg = self.cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        client: Client = (
            RawClient(cfg.url, headers)
            if cfg.client == "raw"
            else HttpxClient(cfg.url, headers, cfg.concurrency, cfg.timeout_s)
        )
        try:
            t0, t1 = await self._run(client)
        finally:
            await client.aclose()
        self.bar.close()
        return RunResult(cfg, self.records, t0, t1)

    async def _run(self, client: Client) -> tuple[float, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s
        if cfg.mode == "closed":
            main = asyncio.create_task(self._closed(client, deadline))
            done, _ = await asyncio.wait([main], timeout=cfg.duration_s + cfg.drain_s)
            if not done:
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        else:
            tasks = await self._open(client, deadline)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + cfg.drain_s - time.perf_counter()))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return t0, time.perf_counter()


async def run_load(cfg: LoadConfig, progress: bool = True) -> RunResult:
    """Run one bounded load against cfg.url and return every request's record."""
    return await _Load(cfg, progress).run()


async def health(url: str, api_key: str | None = None, wait_s: float = 0.0) -> int | None:
    """GET /health: its status code, or None if the server cannot be reached (polled for up to wait_s seconds)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10.0) as client:
        while True:
            try:
                status = (await client.get("/health")).status_code
                if status == 200 or time.monotonic() >= deadline:
                    return status
            except httpx.HTTPError:
                if time.monotonic() >= deadline:
                    return None
            await asyncio.sleep(0.5)


async def resolve_model(url: str, api_key: str | None = None) -> str | None:
    """The first model id of GET /v1/models, or None if the server does not list one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10.0) as client:
            r = await client.get("/v1/models")
            r.raise_for_status()
            data = r.json().get("data") or []
            return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
