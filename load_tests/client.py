"""One streaming request, timed per token event: over httpx (`HttpxClient`: any server, TLS, proxies), or over the raw
client (load_tests/rawclient.py: a few times less CPU per token). Both fold events into a record with `observe` and
offer the same `stream(api, path, body, record, cut_after)` and `aclose()`."""

from __future__ import annotations

import time
from typing import Any

import httpx

from load_tests import protocols
from load_tests.metrics import RequestRecord


def observe(api: str, ev: protocols.Event, record: RequestRecord, now: float, cut_after: int | None) -> bool:
    """Fold one parsed SSE event, arrived at `now`, into record; True when the request is over for the client (its
    final event, [DONE], an error event, or the cut after cut_after token events)."""
    if ev.kind == "error":
        record.error = ev.error
        record.end = now
        return True
    if ev.kind in ("token", "final"):
        record.token_times.append(now)
        record.text += ev.text
    if ev.output_tokens is not None:
        record.output_tokens = ev.output_tokens
    if ev.prompt_tokens is not None:
        record.prompt_tokens = ev.prompt_tokens
    if cut_after is not None and len(record.token_times) >= cut_after and ev.kind == "token":
        record.disconnected = True  # the caller closes the connection mid-stream: the server sees a disconnect
        record.end = now
        return True
    if ev.kind in ("final", "done"):  # TGI's final event ends the request; OpenAI's [DONE]
        record.end = now
        return True
    return False


async def stream_request(
    client: httpx.AsyncClient,
    api: str,
    path: str,
    body: dict[str, Any],
    record: RequestRecord,
    cut_after: int | None = None,
) -> RequestRecord:
    """POST body to path and read its SSE stream into record; stop after cut_after token events if given."""
    clock = time.perf_counter
    try:
        async with client.stream("POST", path, json=body) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                record.error = f"http_{resp.status_code}"
                record.end = clock()
                return record
            async for line in resp.aiter_lines():
                ev = protocols.parse_line(api, line)
                if ev is not None and observe(api, ev, record, clock(), cut_after):
                    return record  # leaving the `async with` closes a stream that was cut
            record.error = "stream:truncated"  # the server closed the stream without its final event
            record.end = clock()
    except httpx.HTTPError as e:
        record.error = type(e).__name__
        record.end = clock()
    return record


class HttpxClient:
    """stream_request over one pooled httpx.AsyncClient."""

    def __init__(self, url: str, headers: dict[str, str], connections: int, timeout_s: float) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(connections, 16))
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self.http = httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout)

    async def stream(
        self, api: str, path: str, body: dict[str, Any], record: RequestRecord, cut_after: int | None = None
    ) -> RequestRecord:
        return await stream_request(self.http, api, path, body, record, cut_after)

    async def aclose(self) -> None:
        await self.http.aclose()
