"""The frontend's engine: a client of the engine core process (server/core_process.py), with handler-side handles.

The core owns the model, the slot pool, scheduling and metrics, in its own process (its own GIL and torch threads).
This side, on the HTTP event loop:
  - `submit_all` sends a request's sequences and awaits the core's verdict (queued, or QueueFull -> 429, ...);
  - a reader callback on the socket's descriptor receives the core's per-step messages (one per engine iteration,
    a whole step as columns) and turns each row into its request's TokenEvent: the incremental detokenization and
    stop-string text happen here, where they cost the core nothing (`advance_token`, the same text step the core runs
    for rows with stop strings, so both reach the same finish verdict); then every stream with due events writes
    them at once (`_flush` -> `Sink.deliver`, server/routes/stream.py), so a stream's handler is not woken per token;
  - a cancelled handle (client gone) is dropped here at once and a Cancel goes to the core, which frees the slot
    before its next step;
  - if the core process dies, every in-flight request ends with a 503 error event, `alive` turns False (/health 503)
    and `crashed` says why; the CLI then exits the server so the orchestrator restarts it (server/cli.py).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import heapq
import itertools
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import zmq

from gam_model.detokenize import Detokenizer, incremental_detokenizer
from gam_model.scoring import TokenLogprobs
from gam_model.stopping import StopChecker, advance_token
from gam_model.tokenizer import Tokenizer
from server import core_process
from server import protocol as p
from server.core import EngineUnavailable, QueueFull, TooManySequences
from server.protocol import GenerationRequest
from server.settings import Settings

__all__ = [
    "Engine",
    "EngineUnavailable",
    "ErrorEvent",
    "Event",
    "FinishEvent",
    "GenerationRequest",
    "QueueFull",
    "RequestHandle",
    "ScoreEvent",
    "Sink",
    "TokenEvent",
    "TooManySequences",
]
log = logging.getLogger(__name__)
# zmq's option and flag values as plain ints: its enums cost a Python-level Flag operation per use, per message
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
START_TIMEOUT_S = 600.0  # model load + CUDA graph capture
# how long a turn of the event loop goes on taking the core's next message before the streams write what those
# carried (a token's added delay when this frontend is behind; when it keeps up, one message waits per turn). A
# message is handled whole, so a turn can run past it by one message (one step of 256 rows) and the writes
READ_BUDGET_S = 0.005
NO_TOP: list[tuple[int, float]] = []  # TokenEvent.top of a request that asked for no alternatives (read-only)
ERRORS: dict[str, Callable[[str], Exception]] = {
    "QueueFull": QueueFull,
    "TooManySequences": TooManySequences,
    "EngineUnavailable": EngineUnavailable,
    "ValueError": ValueError,
}


# -- what handlers receive -----------------------------------------------------------------------------------
@dataclass(slots=True)
class FinishEvent:
    """How a sequence ended normally: reason is eos_token, stop_sequence or length (TGI names)."""

    reason: str
    generated_tokens: int
    seed: int | None
    prompt_tokens: int


@dataclass(slots=True)
class TokenEvent:
    """One generated token: its own text (`text`) and the stop-checked text now safe to emit (`emitted`)."""

    index: int
    id: int
    text: str
    emitted: str
    logprob: float
    special: bool
    top: list[tuple[int, float]]
    finish: FinishEvent | None = None  # set on the last token: the sequence ended normally
    prompt: TokenLogprobs | None = None  # on the first token of a request that asked for prompt logprobs


@dataclass
class ScoreEvent:
    """The one event of a request with max_new_tokens 0: its prompt logprobs (if asked), and nothing generated."""

    prompt: TokenLogprobs | None
    finish: FinishEvent


@dataclass
class ErrorEvent:
    """The sequence ended by an error; status is the HTTP status a non-streaming answer would carry."""

    message: str
    status: int = 500
    error_type: str = "generation"


# a stream ends with a TokenEvent whose `finish` is set, or an ErrorEvent; a score-only request sends one ScoreEvent
Event = TokenEvent | ScoreEvent | ErrorEvent


def is_last(ev: Event) -> bool:
    """Whether ev ends its request's stream."""
    return isinstance(ev, ErrorEvent) or ev.finish is not None


class Sink(Protocol):
    """Where a streamed request's events go as they come, instead of waking its handler (an HTTP stream written from
    the engine's reader: server/routes/stream.py)."""

    def deliver(self) -> None:
        """Take the due events of its handles (RequestHandle.take) and write them; never raises."""


class RequestHandle:
    """The handler's side of a submitted request: an async stream of events and a cancel switch."""

    def __init__(
        self, request_id: int, request: GenerationRequest, engine: Engine, wake_every: int = 1, wake_after: float = 0.0
    ) -> None:
        self.id = request_id
        self.request = request
        # when an event wakes the handler: 0 = only the last (a whole answer is built at the end); k = the first
        # token, then once k events wait, and the last (--stream-interval k for streams); wake_after > 0 (with k > 1):
        # also once the oldest waiting event has waited that many seconds (checked as a later step's events arrive,
        # and by the engine's timer when none comes: --stream-interval-ms)
        self.wake_every = wake_every
        self.wake_after = wake_after
        self._since = 0.0  # when the oldest waiting event came (Engine.now of its step)
        self._held = False  # in the engine's timer heap (Engine._hold)
        self.cancelled = False
        self.done = False  # its last event is queued
        self._engine = engine
        # the handler's inbox: a deque and one future to wake it (an asyncio.Queue costs about twice as much per
        # event, and there is one event per request per engine step)
        self._events: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ready = False  # the waiting events are due to the handler (wake_every)
        self._sink: Sink | None = None  # set: due events go to the sink, on the reader's turn, not to a waiter
        self._generated = 0
        self._detok: Detokenizer | None = None
        self._stop: StopChecker | None = None
        self._special: set[int] = set()  # eos, bos and this request's stop token ids

    def cancel(self) -> None:
        """Drop this request: it leaves the queue, or its slot is freed before the core's next step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._engine._cancel(self)

    def abort(self, message: str) -> None:
        """Cancel from the handler's side and end its event stream now (call on the event loop's thread)."""
        if not self.done and not self.cancelled:
            self.cancel()
            self._put(ErrorEvent(message, 499, "cancelled"))

    def count_failure(self, ev: ErrorEvent) -> None:
        """Count the API call of this request as answered with ev (an error event that ends its stream)."""
        self._engine.count_failure(self.request.endpoint, ev.error_type)

    def _put(self, ev: Event) -> None:
        last = ev.finish is not None if type(ev) is TokenEvent else is_last(ev)  # is_last, the per-token case inline
        if last:
            self.done = True
        events = self._events
        events.append(ev)
        k, n = self.wake_every, len(events)
        if n == 1:
            self._since = self._engine.now
        if (
            last
            or (k and (n >= k or self._generated <= 1))
            or (self.wake_after and self._engine.now - self._since >= self.wake_after)
        ):
            self._wake()
        elif n == 1 and self.wake_after and not self._held:  # it waits: also for the time, though no later
            self._engine._hold(self)  # step comes to check it (a slow step, a stall)

    def _release(self, now: float) -> float | None:
        """The engine's timer: the waiting events are due if the oldest has waited wake_after by `now`; else when
        they will be (None: none wait)."""
        if not self._events or self._ready:
            return None
        due = self._since + self.wake_after
        if due > now:
            return due
        self._wake()
        return None

    def _wake(self) -> None:
        """The waiting events are due: to the sink (at the reader's flush) or the waiting handler."""
        if self._sink is not None:
            if not self._ready:  # else the sink is due already (a later step's token before the flush): once
                self._ready = True
                self._engine._due(self._sink)
            return
        self._ready = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def attach(self, sink: Sink) -> None:
        """Send due events to `sink` from now on (those already due go at the reader's next turn)."""
        self._sink = sink
        if self._ready:
            self._engine._due(sink)

    def detach(self) -> None:
        """The sink's answer is over: later events stay here, unwritten. It also breaks the reference cycle of a
        stream and its handles (sink -> handles -> sink), so both, and all they hold, are freed by reference counting
        when the request ends, not by the garbage collector's next pass."""
        self._sink = None

    def take(self, waiting: bool = False) -> list[Event]:
        """The events due now (RequestHandle.batches' lists), or [] if none are due yet; `waiting`: also those that
        wait for --stream-interval (the stream ends now)."""
        if not self._ready and not waiting:
            return []
        self._ready = False
        batch = list(self._events)
        self._events.clear()
        return batch

    def _token(self, tok: int, logprob: float, fin: p.Finish | None, top: list[tuple[int, float]]) -> TokenEvent:
        """The text step of one generated token (detokenize, stop strings), as the event handlers get."""
        r, stop = self.request, self._stop
        if stop is None:
            tokenizer = self._engine.tokenizer
            self._detok = incremental_detokenizer(tokenizer, r.prompt_ids)
            stop = self._stop = StopChecker(r.stop, tokenizer.eos_token_id, r.stop_token_ids, max(1, r.max_new_tokens))
            self._special = self._engine.special_ids | stop.stop_token_ids
        assert self._detok is not None
        text, emitted, reason = advance_token(self._detok, stop, tok)
        special = tok in self._special
        if special and stop.is_stop_token(tok):
            text = self._engine.tokenizer.id_to_token(tok)  # TGI shows a stop token's own text (e.g. "</s>")
        self._generated += 1
        finish = None
        if fin is not None:
            if reason != fin.reason:  # one text step run in two places: they cannot disagree unless a bug says so
                log.error(
                    "request %d: finish reasons disagree: %s (frontend) vs %s (core)", self.id, reason, fin.reason
                )
            finish = FinishEvent(fin.reason, fin.generated, fin.seed, len(r.prompt_ids))
        return TokenEvent(self._generated - 1, tok, text, emitted, logprob, special, top, finish)

    async def events(self) -> AsyncIterator[Event]:
        """Token events; the last one has `finish` set, or an ErrorEvent ends the stream instead."""
        async for batch in self.batches():
            for ev in batch:
                yield ev

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The same events, as lists of those that waited for the handler: usually one per engine step (per
        --stream-interval steps for a stream; only the whole answer when not streamed); more when the handler falls
        behind, so a stream writes them in one send (the per-token cost that dominates a busy frontend is the HTTP
        stack's per-send work). The last list ends with the last event."""
        while True:
            while not self._ready:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            batch = self.take()
            yield batch
            if is_last(batch[-1]):
                return


# -- the client ------------------------------------------------------------------------------------------------
def _context() -> multiprocessing.context.ForkServerContext:
    """forkserver with the core's modules preloaded: the first core start pays for importing torch and the model
    code, later ones (tests start many servers) fork a process that has them. Never plain fork: the frontend may
    have started threads (and CUDA) that a forked child would inherit broken. Like spawn, it runs the parent's
    `__main__` in the child: scripts that start an engine need an `if __name__ == "__main__":` guard."""
    mp = multiprocessing.get_context("forkserver")
    assert isinstance(mp, multiprocessing.context.ForkServerContext)
    mp.set_forkserver_preload(["server.core_preload"])
    return mp


class CoreProcess:
    """An engine core process (server/core_process.py) at a private ipc:// address."""

    def __init__(self, settings: Settings) -> None:
        self._dir = tempfile.mkdtemp(prefix="gam-")
        self.address = f"ipc://{self._dir}/core"
        self.process = _context().Process(
            target=core_process.main, args=(settings, self.address, os.getpid()), name=core_process.PROCESS_NAME
        )
        self.process.daemon = True  # never outlives the process that started it
        self.process.start()
        # an exit without Engine.shutdown (uvicorn's force quit, an exception): the core ignores the SIGTERM that
        # multiprocessing's own exit handler sends its daemons before it joins them, so kill it first (atexit runs
        # the handlers registered last first)
        atexit.register(self._kill)

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)

    def stop(self, timeout: float) -> None:
        """Wait up to timeout for it to exit (after a Shutdown), then kill it; remove its socket."""
        self.process.join(timeout)
        self._kill()
        atexit.unregister(self._kill)
        shutil.rmtree(self._dir, ignore_errors=True)


class Engine:
    """The engine core process and this frontend's view of it (counts as of its last message)."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer, frontend: int = 0) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.max_batch_size = settings.max_batch_size
        self.request_timeout = settings.request_timeout
        self.special_ids = {i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None}
        self.facts: p.Facts | None = None
        self.crashed: str | None = None  # why the core is gone, once it is
        self.num_running = 0
        self.num_waiting = 0
        self.free_slots = settings.max_batch_size
        self._draining = False
        self._core_drained = False  # the core said p.Drained
        self._stopped = False
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._handles: dict[int, RequestHandle] = {}
        self._pending: dict[int, asyncio.Future] = {}  # Submit / MetricsQuery token -> its answer
        self._core: CoreProcess | None = None  # the core process, when this frontend started it
        self._core_pid: int | None = None  # the core's pid, when another process did
        self._poller: asyncio.Task | None = None
        self._exit_fd: int | None = None
        # a plain (blocking-API) zmq socket used only from the event loop, read from a loop reader callback: a
        # zmq.asyncio recv costs a future, a task wake-up and more per message, about 160 us of CPU against 65 on
        # the 2-core dev machine, and a frontend pays that per engine step (at one stream, per token: bench/
        # frontend_ab.py --streams 1 measured the frontend's CPU per token 0.67x of the zmq.asyncio reader's)
        self._zctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._sock_fd: int | None = None  # registered with the loop (add_reader) while reading
        self._first: asyncio.Future[bytes] | None = None  # the core's first message (Ready or Failed), once it comes
        self._inbox: collections.deque[bytes] = collections.deque()  # the core's messages read, not handled yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Future[None] | None = None
        self._sinks: dict[Sink, None] = {}  # sinks with due events, in order (a dict as an ordered set)
        self._outbox: list[p.ToCore] = []  # messages for the core, sent at the end of this loop turn
        self._outbox_soon = False  # a _send_outbox is scheduled on the loop
        self._flush_soon = False  # a _flush is scheduled on the loop
        # time.monotonic() when the core's message being handled is taken from the inbox (once per message, not per
        # token; a message left for a later turn by READ_BUDGET_S gets that turn's time, not the time it was read)
        self.now = 0.0
        self._dispatching = False  # in _handle_inbox, which flushes at its end
        # --stream-interval-ms: (when due, sequence, handle) of the streams whose events wait, at most one entry per
        # stream (weakly: a finished one is not kept for t), and one timer for the earliest; an entry whose events
        # went out meanwhile is dropped or moved to its newer wait's time when it comes due
        self._held: list[tuple[float, int, weakref.ref[RequestHandle]]] = []
        self._held_seq = itertools.count()
        self._held_timer: asyncio.TimerHandle | None = None
        self._held_due = 0.0  # when the timer is due (time.monotonic())

    # -- lifetime ------------------------------------------------------------------------------------------
    async def start(self) -> p.Facts:
        """Start a core process of our own and wait until it has loaded the model (its facts) or failed
        (RuntimeError)."""
        self._loop = asyncio.get_running_loop()
        self._core = CoreProcess(self.settings)
        self._watch(self._core.process.sentinel)
        return await self._connect(self._core.address)

    async def attach(self, address: str, core_pid: int) -> p.Facts:
        """Connect to a core process another process started (--api-server-count > 1) and watch it."""
        self._loop = asyncio.get_running_loop()
        self._core_pid = core_pid
        try:
            self._watch(os.pidfd_open(core_pid))
        except (AttributeError, OSError):  # not Linux >= 5.3: find out by polling
            self._poller = asyncio.create_task(self._poll_core(core_pid))
        return await self._connect(address)

    def _watch(self, fd: int) -> None:
        assert self._loop is not None
        self._exit_fd = fd
        self._exited = self._loop.create_future()
        self._loop.add_reader(fd, self._on_exit)

    async def _poll_core(self, pid: int) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._on_exit()
                return
            except PermissionError:
                pass

    async def _connect(self, address: str) -> p.Facts:
        assert self._loop is not None
        if self._exited is None:
            self._exited = self._loop.create_future()
        self._zctx = zmq.Context()
        self._sock = self._zctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        for opt in (zmq.SNDHWM, zmq.RCVHWM):  # never drop or refuse a message (a Cancel, a step): no high-water mark
            self._sock.setsockopt(opt, 0)
        self._sock.connect(address)
        first = self._first = self._loop.create_future()
        self._sock_fd = cast(int, self._sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._sock_fd, self._on_readable)
        self._send(p.Hello(self.frontend))
        waits: list[asyncio.Future] = [first, self._exited]
        done, _ = await asyncio.wait(waits, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if first not in done:
            first.cancel()
            await self._close()
            why = f"exited ({self._exit_status()})" if self._exited.done() else "did not start in time"
            raise RuntimeError(f"the engine core process {why}")
        msg = p.decode_from_core(first.result())
        if not isinstance(msg, p.Ready):
            await self._close()
            raise RuntimeError(f"the engine failed to start: {getattr(msg, 'message', msg)}")
        if self._exited.done():  # its exit came with its Ready: _on_exit ran before there were facts to unset
            await self._close()
            raise RuntimeError(f"the engine core process exited ({self._exit_status()})")
        self.facts = msg.facts
        return msg.facts

    def _exit_status(self) -> str:
        if self._core is not None:
            self._core.process.join(1.0)
            return f"exited with code {self._core.process.exitcode}"
        return f"pid {self._core_pid} exited"

    @property
    def alive(self) -> bool:
        """Whether the core process is up and serving."""
        return self.facts is not None and self.crashed is None and not self._stopped

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        """None of this frontend's requests is in flight (or the core is gone)."""
        return not self._handles or not self.alive

    @property
    def drained(self) -> bool:
        """The drain is over for the whole server: the core reported no request left from any frontend (p.Drained),
        and this one has delivered its last events; or the core is gone. A draining server may stop listening then."""
        return not self.alive or (self._core_drained and not self._handles)

    def drain(self, grace: float | None = None) -> None:
        """Stop admitting new requests; requests still running after `grace` seconds (default --shutdown-grace) are
        ended (calling it again can shorten the grace, never extend it)."""
        if not self._draining:
            log.info("draining: %d running, %d waiting", self.num_running, self.num_waiting)
        self._draining = True
        self._send(p.Drain(grace))

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain, wait for in-flight requests (up to the grace period), then stop the core process."""
        if self.alive:
            self.drain(grace)
            limit = time.monotonic() + (self.settings.shutdown_grace if grace is None else grace) + 1.0
            while self.alive and not self.idle and time.monotonic() < limit:
                await asyncio.sleep(0.02)
            if self._core is not None:  # an attached frontend leaves the core to whoever started it
                self._send(p.Shutdown())
        self._stopped = True
        if self._core is not None:
            await asyncio.to_thread(self._core.stop, 10.0)
        await self._close()

    async def _close(self) -> None:
        self._unwatch()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._held.clear()
        if self._poller is not None:
            self._poller.cancel()
        if self._sock_fd is not None:
            assert self._loop is not None
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock_fd)
            self._sock_fd = None
        self._send_outbox()  # what this turn queued (a Cancel) before the socket goes
        self._fail_everything("the engine stopped")
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._zctx is not None:
            self._zctx.term()
        if self._core is not None:
            self._core.stop(0.0)

    def _unwatch(self) -> None:
        if self._loop is not None and self._exit_fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._exit_fd)
            if self._core is None:  # our pidfd
                with contextlib.suppress(OSError):
                    os.close(self._exit_fd)
            self._exit_fd = None

    # -- handler side --------------------------------------------------------------------------------------
    async def submit_all(
        self, requests: list[GenerationRequest], timeout: float | None = None, stream: bool = True
    ) -> list[RequestHandle]:
        """Queue every request or none (the choices of one API call). Raises TooManySequences when they could never
        fit (more than slots + queue), QueueFull when they do not fit now, EngineUnavailable while draining or
        dead, ValueError for a request the engine cannot run. A stream's handler is woken by its first token, then
        every --stream-interval events; a whole answer's (stream False) only by its last event."""
        if not self.alive:
            raise EngineUnavailable(self.down_reason)
        # while draining the core refuses it (and counts it as rejected): the Drain went ahead on the same socket
        for r in requests:
            r.validate()
        arrival = time.monotonic()
        deadline = arrival + (self.request_timeout if timeout is None else timeout)
        wake, after = (self.settings.stream_interval, self.settings.stream_interval_ms / 1e3) if stream else (0, 0.0)
        handles = [
            RequestHandle((self.frontend << p.FRONTEND_SHIFT) | next(self._ids), r, self, wake, after) for r in requests
        ]
        token = next(self._tokens)
        for h in handles:
            self._handles[h.id] = h
        try:
            submit = p.Submit(self.frontend, token, [h.id for h in handles], requests, arrival, deadline)
            error, message = await self._ask(token, submit)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        if error is not None:
            for h in handles:
                self._handles.pop(h.id, None)
            raise ERRORS.get(error, RuntimeError)(message)
        return handles

    def count_failure(self, endpoint: str, error_type: str) -> None:
        """Count an API call answered with an error in the core's gam_request_failures_total. It goes with this
        loop turn's other messages, before any later query of the metrics from this frontend. Not with the core gone
        (its metrics are gone with it)."""
        if self.alive:
            self._send(p.Failure(endpoint, error_type))

    async def metrics_text(self) -> bytes:
        """The core's Prometheus exposition (its registry holds every gam_* metric)."""
        if not self.alive:
            raise EngineUnavailable(self.down_reason)
        token = next(self._tokens)
        text: bytes = await self._ask(token, p.MetricsQuery(token))
        return text

    def _ask(self, token: int, msg: p.ToCore) -> asyncio.Future:
        """Send msg, which the core answers under `token`: the future of its answer. EngineUnavailable if it could
        not be sent (its answer would never come)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        if not self._send(msg):
            del self._pending[token]
            raise EngineUnavailable("could not reach the engine core")
        return fut

    def _cancel(self, h: RequestHandle, failed: bool = False) -> None:
        """Drop h here and in the core (`failed`: this frontend ended it with an error, which the core counts)."""
        if self._handles.pop(h.id, None) is not None and self.alive:
            self._send(p.Cancel([h.id], failed))

    def _send(self, msg: p.ToCore) -> bool:
        """Queue msg for the core: it goes with everything else this turn of the event loop queues, in order, as one
        message (`_send_outbox`); False if it cannot (an answer to it would never come)."""
        if self._sock is None or self._stopped or self._loop is None:
            return False
        self._outbox.append(msg)
        # a flag set after the append, not "the first message": a signal handler (uvicorn's, DrainingServer.
        # handle_exit -> drain) runs between any two bytecodes, also here, and its message would otherwise make the
        # outbox longer than one with no send scheduled, ever (sending twice is harmless: the second finds nothing)
        if not self._outbox_soon:
            self._outbox_soon = True
            self._loop.call_soon(self._send_outbox)
        return True

    def _send_outbox(self) -> None:
        """Send the queued messages; if they cannot be sent, the answers they wait for fail now (EngineUnavailable)."""
        self._outbox_soon = False  # before the swap: a message queued from here on goes in a send of its own
        msgs, self._outbox = self._outbox, []
        if not msgs:
            return
        try:
            raw = p.encode(msgs)
        except Exception:  # one message that cannot be encoded must not take the turn's others with it
            log.exception("a message for the engine core could not be encoded")
            msgs = [m for m in msgs if self._encodes(m)]
            raw = p.encode(msgs)
        try:
            if self._sock is None:
                raise zmq.ZMQError(msg="the socket is closed")
            self._sock.send(raw, flags=_NOBLOCK)  # no high-water mark: it queues, never blocks
        except zmq.ZMQError as e:  # the socket closing at shutdown, or the core gone: its exit watch reports that
            log.warning("could not send %d message(s) to the engine core: %r", len(msgs), e)
            for m in msgs:
                self._fail_answer(m, "could not reach the engine core")
            return
        # a zmq socket's file descriptor is edge-triggered and a send can consume the edge of messages that came
        # meanwhile: look again on the loop's next turn (zmq_getsockopt(3), ZMQ_FD)
        if self._sock_fd is not None and self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _encodes(self, m: p.ToCore) -> bool:
        """Whether m can be encoded; if not, what waits for its answer fails."""
        try:
            p.encode(m)
        except Exception as e:
            self._fail_answer(m, f"the request could not be sent to the engine core: {e}")
            return False
        return True

    def _fail_answer(self, m: p.ToCore, message: str) -> None:
        """The answer m waits for (a Submit's, a MetricsQuery's) will never come: fail it (EngineUnavailable)."""
        fut = self._pending.pop(m.token, None) if isinstance(m, (p.Submit, p.MetricsQuery)) else None
        if fut is not None and not fut.done():
            fut.set_exception(EngineUnavailable(message))

    @property
    def down_reason(self) -> str:
        return f"the engine is not running ({self.crashed})" if self.crashed else "the engine is not running"

    # -- the core's messages -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        """The socket's descriptor fired (or a send may have hidden a message): take every message waiting into the
        inbox, then handle it (_handle_inbox)."""
        was_empty = not self._inbox
        self._read()
        if self._inbox and was_empty:  # else a _handle_inbox is scheduled already
            self._handle_inbox()

    def _read(self) -> None:
        """Take every message waiting on the socket into the inbox (the first goes to _connect)."""
        sock = self._sock
        if sock is None or self._sock_fd is None:
            return
        inbox = self._inbox
        while True:
            try:
                if not cast(int, sock.get(_EVENTS)) & _POLLIN:
                    break
                raw = sock.recv(_NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno != zmq.EAGAIN:
                    log.warning("could not read from the engine core: %r", e)
                break
            first = self._first
            if first is not None and not first.done():  # the Ready (or Failed) that _connect waits for
                first.set_result(raw)
                continue
            inbox.append(raw)

    def _handle_inbox(self, budget: float | None = None) -> None:
        """Handle the core's messages in the inbox, in order, then let every stream with due events write them,
        once: one write per stream per turn, not per core message (a frontend behind the core sends each stream the
        tokens of the steps it handled in one write, as vLLM's output collectors merge what a slow handler has not
        taken; each token is still its own event). The budget keeps a frontend that falls behind responsive: before
        it, one turn handled every step waiting, and /health and new requests waited for all of them
        (bench/frontend_capacity.py, a saturated frontend: /health p50 163-201 ms before, 26 ms with it; CPU per
        token and tokens/s the same within the noise). A turn takes no new message once READ_BUDGET_S has
        passed (at least one, handled whole: a turn can run past the budget by a message and the writes): then the
        streams write and the rest waits for the loop's next turn, after its other callbacks (new requests, /health).
        `budget` (seconds) replaces READ_BUDGET_S (math.inf: handle them all now)."""
        inbox = self._inbox
        budget = READ_BUDGET_S if budget is None else budget
        self._dispatching = True  # the sinks made due here are flushed at the end, not one by one
        start = time.monotonic()
        try:
            while inbox:
                try:
                    msg = p.decode_from_core(inbox.popleft())
                    if isinstance(msg, p.CoreOutput):
                        self._dispatch(msg)
                    elif isinstance(msg, p.MetricsText):
                        self._answer(msg.token, msg.text)
                    elif isinstance(msg, p.Failed):  # the core's loop died; its process exits next
                        self._crash(msg.message)
                    elif isinstance(msg, p.Drained):
                        self._core_drained = True
                except Exception:  # one bad message must not stop the stream of every other request
                    log.exception("could not handle a message from the engine core")
                if inbox and time.monotonic() - start >= budget:
                    asyncio.get_running_loop().call_soon(self._handle_inbox)
                    break
        finally:
            self._dispatching = False
            self._flush()

    def _answer(self, token: int, value: object) -> None:
        fut = self._pending.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _due(self, sink: Sink) -> None:
        """Sink has due events: it gets them once the core's messages of this turn are handled, or at the loop's next
        turn."""
        self._sinks[sink] = None
        if not self._flush_soon and not self._dispatching:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _hold(self, h: RequestHandle) -> None:
        """h's events wait for --stream-interval: they are due once the oldest has waited h.wake_after, even when no
        later step comes to check (a slow step, a stall); per wait, not per token."""
        due = h._since + h.wake_after
        h._held = True
        heapq.heappush(self._held, (due, next(self._held_seq), weakref.ref(h)))
        if self._held_timer is None or due < self._held_due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
        self._held_due = due
        loop = asyncio.get_running_loop()
        # Engine.now is time.monotonic(); the loop's clock may be another (uvloop's): a delay, not a time
        self._held_timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), self._release_held)

    def _release_held(self) -> None:
        """The timer: every held stream whose oldest event has waited long enough gets its events now."""
        self._held_timer = None
        held, now = self._held, time.monotonic()
        while held and held[0][0] <= now:
            _, seq, ref = heapq.heappop(held)
            h = ref()
            if h is None:
                continue
            h._held = False
            later = h._release(now)
            if later is not None:  # its events went out meanwhile and newer ones wait
                h._held = True
                heapq.heappush(held, (later, seq, ref))
        if held:
            self._arm(held[0][0])

    def _flush(self) -> None:
        """Every due sink writes what its handles have (once per step: one write per stream, not per token)."""
        self._flush_soon = False
        while self._sinks:
            sinks, self._sinks = self._sinks, {}
            for sink in sinks:
                try:
                    sink.deliver()
                except Exception:  # a bug in one stream's writer must not stall the others
                    log.exception("a stream's writer failed")

    def _dispatch(self, out: p.CoreOutput) -> None:
        """One core message: replies, then each row's token event, then scores and errors (one wake-up each; the
        streams write at the end of the turn, _handle_inbox)."""
        self.now = time.monotonic()
        for rep in out.replies:
            self._answer(rep.token, (rep.error, rep.message))
        handles = self._handles
        if out.ids:
            ids, tokens, logprobs = out.columns()
            finished, top, prompts = out.finished, out.top, out.prompts
            get = handles.get
            for row, rid in enumerate(ids):
                h = get(rid)
                if h is None:  # cancelled here already
                    continue
                fin = finished.get(row) if finished else None
                try:
                    alts = list(zip(*top[row], strict=True)) if top and row in top else NO_TOP
                    tev = h._token(tokens[row], logprobs[row], fin, alts)
                    if prompts:
                        tev.prompt = prompts.pop(rid, None)
                    ev: Event = tev
                except Exception as e:  # this request's text step failed: end it alone
                    log.exception("request %d: token handling failed", rid)
                    ev, fin = ErrorEvent(f"token handling failed: {e}"), None
                    self._cancel(h, failed=True)
                if fin is not None:
                    del handles[rid]
                h._put(ev)
        for rid in out.scored:
            h = handles.pop(rid, None)
            if h is not None:
                score = FinishEvent("length", 0, None, len(h.request.prompt_ids))
                h._put(ScoreEvent(out.prompts.get(rid), score))
        for err in out.errors:
            h = handles.pop(err.id, None)
            if h is not None:
                # lengths and outcome only, as everywhere: the core logged the cause with its traceback
                log.log(logging.ERROR if err.status == 500 else logging.INFO, "request %d ended: %d %s (%s)", err.id,
                        err.status, err.kind, err.message)  # fmt: skip
                h._put(ErrorEvent(err.message, err.status, err.kind))
        self.num_running, self.num_waiting, self.free_slots = out.running, out.waiting, out.free_slots

    def _on_exit(self) -> None:
        """The core process ended: fail what is in flight, turn unhealthy, let the CLI stop the server."""
        self._unwatch()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)
        if self.facts is not None and not self._stopped:
            # what the core sent before it exited goes first, also what waits for a later turn of the loop (the
            # budget): streams that finished get their last tokens, not a 503, and a Failed says why the core died
            self._read()
            self._handle_inbox(math.inf)
            self._crash(f"the engine core process {self._exit_status()}")

    def _crash(self, why: str) -> None:
        """Turn unhealthy first, then fail every request in flight (so a client that has its error sees /health 503)."""
        if self.crashed is not None:
            return
        self.crashed = why
        log.error("%s: failing %d requests", why, len(self._handles))
        self._fail_everything(why)

    def _fail_everything(self, message: str) -> None:
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h._put(ErrorEvent(message, 503, "unhealthy"))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable(message))
        self._pending.clear()
        self.num_running = self.num_waiting = 0
