"""A lean HTTP/1.1 client for the load generator: asyncio protocols and httptools' C parser (chunked bodies included),
keep-alive connections, and every SSE event folded into its record inside the read callback, so a token costs no
coroutine wake-up. On a small machine the client shares the CPU with the server it measures: httpx spends several
hundred microseconds of CPU per streamed token, this a few tens. Plain http:// only (loopback load tests)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from load_tests import protocols
from load_tests.client import observe
from load_tests.metrics import RequestRecord


class _Exchange:
    """One request on a connection: parses its SSE lines into the record as bytes arrive."""

    def __init__(self, api: str, record: RequestRecord, cut_after: int | None) -> None:
        self.api, self.record, self.cut_after = api, record, cut_after
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.over = False  # the client has what it needs (final event, [DONE], error event, cut)
        self.cut = False
        self._tail = b""  # an unfinished line

    def body(self, data: bytes, now: float) -> None:
        if self.status != 200 or self.over:
            return
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for raw in lines:
            ev = protocols.parse_line(self.api, raw.decode("utf-8", "replace"))
            if ev is not None and observe(self.api, ev, self.record, now, self.cut_after):
                self.over = True
                self.cut = self.record.disconnected
                return

    def complete(self, now: float, whole: bool) -> None:
        """The response ended: whole (its last chunk came), or cut (the connection closed before it). Errors are
        named as the httpx client names them, so both report the same statistics."""
        rec = self.record
        if not self.over:
            if not whole:  # httpx: the peer closed the connection without a response or a whole body
                rec.error = "RemoteProtocolError"
            elif self.status != 200:
                rec.error = f"http_{self.status}"
            else:
                rec.error = "stream:truncated"  # a whole 200 response without its final event
            rec.end = now
        if not self.done.done():
            self.done.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls on_* as the response is parsed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.reusable = True
        self._now = 0.0

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()  # every event in this read arrived now
        if self.exchange is None:  # bytes nobody asked for
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()  # connection_lost ends the exchange
            return
        ex = self.exchange
        if ex is not None and ex.cut:
            self.close()  # the client cuts the stream: the server sees a disconnect

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.complete(time.perf_counter(), whole=False)

    # httptools
    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()
            self.exchange.record.status = self.exchange.status
        self.reusable = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body(body, self._now)

    def on_message_complete(self) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.complete(self._now, whole=True)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class RawClient:
    """Streaming POSTs to one http:// server over a pool of keep-alive connections."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the raw client speaks plain http://host:port only, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.base = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{extra}"
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._all.discard(conn)  # closed by the server while idle
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        self._all.add(conn)
        return conn

    async def stream(
        self, api: str, path: str, body: dict[str, Any], record: RequestRecord, cut_after: int | None = None
    ) -> RequestRecord:
        """POST body to path and fold its SSE stream into record (stream_request's contract)."""
        payload = json.dumps(body).encode()
        try:
            conn = await self._acquire()
        except OSError:  # refused, unreachable: httpx's name for it, as the httpx client reports it
            record.error, record.end = "ConnectError", time.perf_counter()
            return record
        ex = conn.exchange = _Exchange(api, record, cut_after)
        head = f"POST {self.base}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(payload)}\r\n\r\n"
        assert conn.transport is not None
        conn.transport.write(head.encode() + payload)
        try:
            await ex.done
        finally:
            if conn.exchange is ex:  # cancelled (a timeout) mid-response: the connection cannot be reused
                conn.exchange = None
                conn.close()
            if conn.reusable:
                self._idle.append(conn)
            else:
                self._all.discard(conn)
        return record

    async def aclose(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()
