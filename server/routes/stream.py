"""A streamed (Server-Sent Events) answer written by the engine's reader as the core's steps arrive.

The handler sends the response head, attaches the stream to its requests' handles and sleeps until the answer is
over: it is not woken per token. Each engine step, the reader (server/engine.py `Engine._flush`) calls `deliver` on
every stream with due events (per --stream-interval): the API's `render` turns them into SSE events and they go out
in one ASGI send, run at once on the reader's turn (a send completes without suspending unless the client's socket
buffer is full; then the rest of that send and what comes after it wait in a task of their own, in order, and other
streams go on). This takes the per-token task wake-up, future and async-generator chain off the host path.

The body chunks go to the server's own `send` (stashed in the scope by the app, `BODY_SEND`), past Starlette's
middleware wrappers: those only watch for the response start (which still goes through them, as do the errors
raised before it) and cost two coroutine frames per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.engine import ErrorEvent, Event, RequestHandle, is_last

log = logging.getLogger(__name__)

# (choice index, event, output list) -> append the event's SSE bytes; False when the stream ends here (an error)
Render = Callable[[int, Event, list[bytes]], bool]
BODY_SEND = "gam.body_send"  # scope key: the ASGI server's send, set by the app (server/app.py GamApp)
HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """The rest of a coroutine that was started by hand and suspended on `waiting`: what it waits on is passed to
    the task running this, and what the task is woken with goes back in (as `await` itself does)."""
    while True:
        try:
            value = yield waiting
        except BaseException as e:  # cancellation and errors go to the coroutine, as await does
            try:
                waiting = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting = coro.send(value)
            except StopIteration as stop:
                return stop.value


def run_now(aw: Awaitable[None]) -> Awaitable[None] | None:
    """Run a coroutine on this turn of the loop: None if it finished without suspending (its exception is raised
    here), else an awaitable of its rest (any other awaitable is returned as is)."""
    # the type first: an ABC's isinstance costs about a microsecond, once per write of every stream
    if type(aw) is not types.CoroutineType and not isinstance(aw, Coroutine):
        return aw
    coro = aw
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return _resume(coro, waiting)


class EventStream(Response):
    """The SSE answer of one API call's requests (its choices), written from the engine's reader."""

    media_type = None  # the Content-Type is in HEADERS: a media type here would also document the API's errors as SSE

    def __init__(
        self,
        handles: list[RequestHandle],
        render: Render,
        head: list[bytes] | None = None,
        tail: Callable[[bool], bytes] | None = None,
    ) -> None:
        """head: events sent before any token (an echoed prompt); tail(ok): the events after the last one (ok:
        no error ended the stream)."""
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.handles, self._render, self._head, self._tail = handles, render, head or [], tail
        self._open = len(handles)  # choices not finished yet
        self._ended = False  # the last write is made (or the client is gone): later events are dropped
        self._send: Send | None = None
        self._done: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None  # a send waiting on a full socket, and what queued behind it
        self._backlog: list[bytes] = []
        self._backlog_more = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = scope.get(BODY_SEND, send)  # the body chunks: straight to the server (the module docstring)
        self._done = asyncio.get_running_loop().create_future()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if self._head:
                await send({"type": "http.response.body", "body": b"".join(self._head), "more_body": True})
            for h in self.handles:
                h.attach(self)
            watcher = asyncio.create_task(self._watch(receive))
            try:
                await self._done
            finally:
                watcher.cancel()
            if self._writer is not None:  # the client is gone while a send waited: let it see that
                await self._writer
        finally:
            self._ended = True
            self._cancel()
            for h in self.handles:
                h.detach()  # nothing more can be written; frees the stream without the garbage collector

    def _cancel(self) -> None:
        for h in self.handles:
            h.cancel()  # no-op once finished

    async def _watch(self, receive: Receive) -> None:
        """End the answer and free the requests' slots when the client goes away."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._ended:
            log.info("client closed the stream: cancelling %d request(s)", len(self.handles))
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._cancel()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def deliver(self) -> None:
        """Write what the handles have due, in one send; after the last event, the tail and the end of the body."""
        if self._ended:
            for h in self.handles:
                h.take()  # dropped: the answer is over
            return
        out: list[bytes] = []
        ok, last = True, False
        failure: ErrorEvent | None = None  # the error event that ends the answer: the call is counted as failed once
        render = self._render
        try:
            handles = self.handles
            # (one choice, nearly every stream: no comprehension, no function frame for it)
            batches = [handles[0].take()] if len(handles) == 1 else [h.take() for h in handles]
            # an error ends the whole stream: first every choice's tokens that came before it, also those still
            # waiting for --stream-interval (at k = 1 they went out as they came), then the (first) error event
            errors = []
            for k, b in enumerate(batches):
                if b and type(b[-1]) is ErrorEvent:
                    errors.append((k, cast(ErrorEvent, b.pop())))
            if errors:
                batches = [b or h.take(waiting=True) for h, b in zip(handles, batches, strict=True)]
            for k, batch in enumerate(batches):
                for ev in batch:
                    render(k, ev, out)  # tokens and normal ends: rendered, never the end of the stream
                if batch and is_last(batch[-1]):  # its last event (errors were popped above): once per batch
                    self._open -= 1
            if errors:
                failure = errors[0][1]
                ok = render(*errors[0], out)
            last = not ok or self._open == 0
            if last and self._tail is not None:
                out.append(self._tail(ok))
        except Exception:
            log.exception("rendering a stream's events failed: ending it with an error event")
            last = True
            try:  # the API's own error event (and its end, e.g. OpenAI's [DONE]), so the client sees why it ended
                failure = ErrorEvent("internal error while rendering the answer")
                render(0, failure, out)
                if self._tail is not None:
                    out.append(self._tail(False))
            except Exception:
                log.exception("rendering the error event failed too")
        if failure is not None:  # before the write: a client that has it finds it counted in its next scrape
            self.handles[0].count_failure(failure)
        if out or last:
            self._write(b"".join(out), more=not last)
        if last:
            self._cancel()  # the others, after an error

    def _write(self, data: bytes, more: bool) -> None:
        if self._writer is not None:  # behind a send that waits on the socket
            self._backlog.append(data)
            self._backlog_more = more
            return
        assert self._send is not None
        try:
            rest = run_now(self._send({"type": "http.response.body", "body": data, "more_body": more}))
        except Exception as e:  # the connection is gone (an ASGI 2.4 server raises OSError)
            log.info("stream write failed (%r): ending it", e)
            self._end()
            return
        if rest is not None:
            self._writer = asyncio.ensure_future(self._drain(rest, more))
        elif not more:
            self._end()

    async def _drain(self, rest: Awaitable[None], more: bool) -> None:
        """Finish a send that waited on the socket, then send what queued behind it (joined)."""
        assert self._send is not None
        try:
            await rest
            while self._backlog:
                data, more = b"".join(self._backlog), self._backlog_more
                self._backlog.clear()
                await self._send({"type": "http.response.body", "body": data, "more_body": more})
        except Exception as e:
            log.info("stream write failed (%r): ending it", e)
            more = False
        finally:
            self._writer = None
        if not more:
            self._end()
