"""The httpx and raw clients fold the same bytes on the wire into the same record: a stream written a byte at a time
(lines and UTF-8 characters split across reads), a 429 with a JSON body, a stream the server cuts, a refused
connection; and a keep-alive connection is reused after each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from load_tests.client import stream_request
from load_tests.metrics import RequestRecord
from load_tests.rawclient import RawClient
from load_tests.runner import run

TEXTS = ["h\u00e9", " \u20ac\u20ac", " \U0001f600"]  # 2-, 3- and 4-byte UTF-8 characters


def tgi_events(final: bool) -> bytes:
    out = b""
    for i, text in enumerate(TEXTS):
        ev = {"index": i, "token": {"id": i, "text": text, "logprob": -1.0, "special": False}}
        ev["generated_text"] = "".join(TEXTS) if final and i == len(TEXTS) - 1 else None
        ev["details"] = {"generated_tokens": len(TEXTS)} if ev["generated_text"] is not None else None
        out += b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n"
    return out


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hung: asyncio.Event) -> None:
    """HTTP/1.1 keep-alive: each POST's `inputs` says how to answer it."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
        how = json.loads(await reader.readexactly(length))["inputs"]
        if how == "hang":  # headers, then nothing: the client gives up (a timeout)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            hung.set()
            await asyncio.Event().wait()
        if how == "429":
            body = json.dumps({"error": "Model is overloaded", "error_type": "overloaded"}).encode()
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
            continue
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        if how == "bytewise":  # one chunk per byte, each its own write and read
            for b in tgi_events(final=True):
                writer.write(chunk(bytes([b])))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif how == "cut":  # the server goes away mid-stream (a crash): no final event, no last chunk
            writer.write(chunk(tgi_events(final=False)))
            await writer.drain()
            writer.close()
            return
        else:  # a whole response without a final event
            writer.write(chunk(tgi_events(final=False)) + b"0\r\n\r\n")
        await writer.drain()


Send = Callable[[str], Awaitable[RequestRecord]]


async def client_for(kind: str, url: str, stack: list) -> Send:
    if kind == "raw":
        raw = RawClient(url)
        stack.append(raw.aclose)
        return lambda how: raw.stream("tgi", "/generate_stream", {"inputs": how}, RequestRecord(start=0.0))
    hc = httpx.AsyncClient(base_url=url)
    stack.append(hc.aclose)
    return lambda how: stream_request(hc, "tgi", "/generate_stream", {"inputs": how}, RequestRecord(start=0.0))


async def outcomes(kind: str, url: str, plan: list[str]) -> list[tuple]:
    stack: list = []
    send = await client_for(kind, url, stack)
    try:
        out = []
        for how in plan:
            r = await send(how)
            out.append((how, r.status, r.error, r.text, len(r.token_times), r.output_tokens, r.end is not None))
        return out
    finally:
        for close in stack:
            await close()


@contextlib.asynccontextmanager
async def server(hung: asyncio.Event | None = None) -> AsyncIterator[str]:
    """A server answering by `answer` on 127.0.0.1; `hung` is set once a "hang" request has its headers."""
    hung = asyncio.Event() if hung is None else hung
    tasks: set[asyncio.Task] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await answer(reader, writer, hung)
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


PLAN = ["bytewise", "429", "bytewise", "cut", "bytewise", "whole", "bytewise"]


async def test_both_clients_record_the_same_outcomes() -> None:
    async with server() as url:
        raw, ref = await outcomes("raw", url, PLAN), await outcomes("httpx", url, PLAN)
    text = "".join(TEXTS)
    assert ref == [
        ("bytewise", 200, None, text, 3, 3, True),
        ("429", 429, "http_429", "", 0, None, True),
        ("bytewise", 200, None, text, 3, 3, True),
        ("cut", 200, "RemoteProtocolError", text, 3, None, True),
        ("bytewise", 200, None, text, 3, 3, True),
        ("whole", 200, "stream:truncated", text, 3, None, True),
        ("bytewise", 200, None, text, 3, 3, True),
    ]
    assert raw == ref


def test_the_load_generators_loop_runs_both_clients_alike() -> None:
    """`run`, the load generator's entry point, runs on uvloop where it is installed (it is, with uvicorn[standard]);
    the raw client records there what httpx records (uvloop's transports do not subclass asyncio.Transport)."""

    async def both() -> tuple[list, list, str]:
        async with server() as url:
            raw, ref = await outcomes("raw", url, PLAN), await outcomes("httpx", url, PLAN)
        return raw, ref, type(asyncio.get_running_loop()).__module__

    raw, ref, loop_module = run(both())
    assert loop_module.startswith("uvloop") or not hasattr(asyncio, "Runner")  # Python 3.10: asyncio's loop
    assert raw == ref and len(ref) == len(PLAN) and ref[0][2] is None


@pytest.mark.parametrize("kind", ["httpx", "raw"])
async def test_a_refused_connection_is_a_connect_error(kind: str) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listened on (and no other process takes it)
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert await outcomes(kind, url, ["x"]) == [("x", None, "ConnectError", "", 0, None, True)]


@pytest.mark.parametrize("kind", ["httpx", "raw"])
async def test_a_request_given_up_mid_stream_leaves_the_client_usable(kind: str) -> None:
    hung_up = asyncio.Event()
    async with server(hung_up) as url:
        stack: list = []
        send = await client_for(kind, url, stack)
        try:
            hung = asyncio.create_task(send("hang"))
            await hung_up.wait()
            hung.cancel()  # what the runner's wait_for does at --timeout
            await asyncio.gather(hung, return_exceptions=True)
            r = await send("bytewise")
            assert (r.status, r.error, r.text, r.output_tokens) == (200, None, "".join(TEXTS), 3)
        finally:
            for close in stack:
                await close()
