"""The continuous-batching engine: one thread owns the model and the slot pool; handlers await token events.

Each iteration of the loop (between two decode steps):
  1. ends running sequences that were cancelled (client gone) or ran past their deadline, freeing their slots;
  2. admits waiting requests into free slots and prefills them all in one call (O(R) per prompt); a request
     that asked for prompt logprobs is first scored, about SCORE_BUDGET_S of work per iteration, then prefilled;
  3. steps every sequence that was already running in one call;
  4. samples the next token of all those rows in one batched call, detokenizes, checks stops, emits events.
A failure in the prefill, step or sampling call fails only that call's requests (an ErrorEvent each); the loop
goes on. Events cross to asyncio through `loop.call_soon_threadsafe` into per-request queues.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from gam_model.decode import Decoder
from gam_model.detokenize import IncrementalDetokenizer
from gam_model.model import GAM
from gam_model.sampling import SamplingParams, SequenceSampler, sample
from gam_model.scoring import PromptScorer, TokenLogprobs
from gam_model.stopping import StopChecker, advance_token
from gam_model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# Prompt logprobs: each engine iteration scores prompt chunks for about SCORE_BUDGET_S seconds (at least one chunk)
# before its decode step, so running streams keep flowing. A chunk is SCORE_HEAD_CHUNK positions below block_size
# (one forward each) or SCORE_WINDOWS R-token windows past it. (Bundled model on the 2-core dev CPU: 32 windows take
# about 35 ms; scoring 256 windows, or the whole 1024-position head, per iteration left a concurrent stream 0.3 s
# gaps between tokens.)
SCORE_BUDGET_S = 0.03
SCORE_WINDOWS = 32
SCORE_HEAD_CHUNK = 128


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue; the client should retry later (429)."""


class TooManySequences(ValueError):
    """A request with more sequences than the server can ever hold at once (slots + queue): retrying cannot help."""


class EngineUnavailable(RuntimeError):
    """The engine is draining for shutdown or its loop has died (503)."""


# -- what handlers submit and receive ----------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """One sequence to generate: prompt ids, sampling parameters and stop conditions."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    endpoint: str = "generate"  # metrics label
    # prompt logprobs (TGI decoder_input_details, OpenAI echo + logprobs): None = not asked, n = with top-n
    # alternatives. O(prompt) work in the engine thread at admission, unlike the O(R) prefill. With
    # max_new_tokens 0 the request only scores its prompt (OpenAI echo + max_tokens 0): no prefill, no token.
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError for a request the engine cannot run."""
        if not self.prompt_ids:
            raise ValueError("empty prompt")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class FinishEvent:
    """How a sequence ended normally: reason is eos_token, stop_sequence or length (TGI names)."""

    reason: str
    generated_tokens: int
    seed: int | None
    prompt_tokens: int


@dataclass
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


# -- plain stats the metrics module maps onto Prometheus ---------------------------------------------------
@dataclass
class StepStats:
    """One engine iteration: rows sampled, of which newly prefilled, and its wall time."""

    batch_size: int
    prefilled: int
    duration_s: float
    generated_tokens: int
    scored_tokens: int = 0  # prompt tokens scored for prompt logprobs in this iteration


@dataclass
class RequestStats:
    """One finished request (any outcome)."""

    endpoint: str
    finish_reason: str  # length, eos_token, stop_sequence, cancelled, error
    prompt_tokens: int
    generated_tokens: int
    queue_s: float | None
    ttft_s: float | None
    duration_s: float
    inter_token_s: list[float]


def is_last(ev: Event) -> bool:
    """Whether ev ends its request's stream."""
    return isinstance(ev, ErrorEvent) or ev.finish is not None


class RequestHandle:
    """The handler's side of a submitted request: an async stream of events and a cancel switch."""

    def __init__(
        self,
        request_id: int,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        withdraw: Callable[[RequestHandle], None],
    ) -> None:
        self.id = request_id
        self.request = request
        self.arrival = time.monotonic()
        self.deadline = deadline
        self.cancelled = False
        self.done = False  # its last event is on its way (set by the engine thread)
        self.loop = loop
        self._withdraw = withdraw  # the engine drops it from the waiting queue at once if it is still there
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        """Ask the engine to drop this request: a waiting one leaves the queue now, a running one's slot is freed
        within one step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._withdraw(self)

    def abort(self, message: str) -> None:
        """Cancel from the handler's side and end its event stream now (call on the event loop's thread)."""
        if not self.done and not self.cancelled:
            self._queue.put_nowait(ErrorEvent(message, 499, "cancelled"))
            self.cancel()

    def _deliver(self, ev: Event) -> None:
        """On the event loop's thread: the engine's events, in order."""
        self._queue.put_nowait(ev)

    async def events(self) -> AsyncIterator[Event]:
        """Token events; the last one has `finish` set, or an ErrorEvent ends the stream instead."""
        while True:
            ev = await self._queue.get()
            yield ev
            if is_last(ev):
                return


def _deliver_all(batch: list[tuple[RequestHandle, Event]]) -> None:
    for h, ev in batch:
        h._deliver(ev)


# -- the engine ----------------------------------------------------------------------------------------------
@dataclass
class _Sequence:
    handle: RequestHandle
    slot: int
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    stopper: StopChecker
    admitted: float
    pending: int = -1  # last sampled token, fed to the model by the next step
    scorer: PromptScorer | None = None  # while its prompt logprobs are being computed (before prefill)
    prompt: TokenLogprobs | None = None  # prompt logprobs, until the first token event carries them
    generated: int = 0
    first_token: float | None = None
    last_token: float | None = None
    inter_token: list[float] = field(default_factory=list)


class _Faults:
    """Test-only fault injection parsed from settings: 'step:N' (N-th decode step raises), 'crash:N'."""

    def __init__(self, spec: str | None) -> None:
        self.fail_step: set[int] = set()
        self.crash_at: int | None = None
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            kind, _, n = part.strip().partition(":")
            if kind == "step":
                self.fail_step.add(int(n))
            elif kind == "crash":
                self.crash_at = int(n)
            else:
                raise ValueError(f"unknown fault injection {part!r} (use step:N or crash:N)")


class Engine:
    """Continuous-batching generation over a Decoder's slot pool, driven by one background thread."""

    def __init__(
        self,
        model: GAM,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int,
        max_queue: int,
        request_timeout: float,
        device: torch.device,
        dtype: torch.dtype,
        shutdown_grace: float = 10.0,
        fault_injection: str | None = None,
        cuda_graphs: bool = False,
        deterministic: bool = False,
    ) -> None:
        # CUDA graphs only on CUDA: on CPU the decoder's replay stand-in is a test aid with no speed-up
        graphs = cuda_graphs and device.type == "cuda"
        self.decoder = Decoder(model, max_batch_size, device, dtype, cuda_graphs=graphs, deterministic=deterministic)
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.device = self.decoder.device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.shutdown_grace = shutdown_grace
        self.special_ids = {i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None}
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_request: Callable[[RequestStats], None] | None = None
        self._faults = _Faults(fault_injection)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[_Sequence] = []
        self._steps = 0
        self._busy_iterations = 0
        self._draining = False
        self._drain_deadline = float("inf")
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of the current iteration, sent by _flush
        self._outbox_lock = threading.Lock()
        self.crashed: BaseException | None = None

    # -- lifetime ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> None:
        """Start the engine thread and wait until it is warmed up (CUDA graphs captured) and looping."""
        self._thread = threading.Thread(target=self._loop, name="gam-engine", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self.crashed is not None:
            raise RuntimeError(f"the engine failed to start: {self.crashed!r}") from self.crashed

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running (warmed up, and not crashed)."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set() and self.crashed is None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        """No request running or waiting (or the loop is gone): a draining server may stop listening."""
        return not (self._running or self._waiting) or not self.alive

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def drain(self, grace: float | None = None) -> None:
        """Stop admitting new requests; requests still running after `grace` seconds are ended (calling it again
        can shorten the grace, never extend it)."""
        with self._cond:
            deadline = time.monotonic() + (self.shutdown_grace if grace is None else grace)
            if not self._draining:
                self._draining = True
                log.info("draining: %d running, %d waiting", len(self._running), len(self._waiting))
            self._drain_deadline = min(self._drain_deadline, deadline)  # a second call can only shorten the grace
            self._cond.notify()

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain, wait for in-flight requests (up to the grace period), then stop the thread."""
        self.drain(grace)
        while self.alive and (self._running or self._waiting) and time.monotonic() < self._drain_deadline + 1.0:
            await asyncio.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # -- handler side --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, timeout: float | None = None) -> RequestHandle:
        """Queue one request (see submit_all)."""
        return self.submit_all([request], timeout)[0]

    def submit_all(self, requests: list[GenerationRequest], timeout: float | None = None) -> list[RequestHandle]:
        """Queue every request or none (the choices of one API call). Raises TooManySequences when they could never
        fit (more than slots + queue), QueueFull when they do not fit now, EngineUnavailable while draining or
        dead, ValueError for a request the engine cannot run."""
        if not self.alive or self._draining:
            raise EngineUnavailable("the server is shutting down" if self._draining else "the engine is not running")
        for r in requests:
            r.validate()
        limit = self.max_batch_size + self.max_queue
        if len(requests) > limit:
            raise TooManySequences(
                f"the request asks for {len(requests)} sequences (prompts x n); this server runs and queues at most "
                f"{limit} at once (max batch size {self.max_batch_size} + max queue {self.max_queue})"
            )
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        with self._cond:
            capacity = self.max_queue + self.decoder.state.free_slots
            if len(self._waiting) + len(requests) > capacity:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (max queue {self.max_queue}); "
                    f"{len(requests)} more do not fit now"
                )
            handles = [RequestHandle(next(self._ids), r, loop, deadline, self._withdraw) for r in requests]
            self._waiting.extend(handles)
            self._cond.notify()
        return handles

    def _withdraw(self, h: RequestHandle) -> None:
        """A cancelled request that is still waiting leaves the queue (and the waiting gauge) now."""
        with self._cond:
            try:
                self._waiting.remove(h)
            except ValueError:
                return  # admitted already (the engine thread frees its slot) or ended
            self._end_waiting(h, None, "cancelled")

    # -- engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self.decoder.warmup()  # capture every bucket's graph up front (no-op without graphs)
            log.info(
                "engine loop started: %d slots on %s (cuda graphs: %s)",
                self.max_batch_size,
                self.device,
                self.decoder.cuda_graphs,
            )
            self._ready.set()
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._stopping):
                        self._cond.wait(timeout=0.5)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                finally:
                    self._flush()
        except BaseException as e:
            self.crashed = e
            log.exception("engine loop died")
        finally:
            self._ready.set()  # never leave start() waiting
            reason = "the engine stopped" if self.crashed is None else f"the engine loop died: {self.crashed!r}"
            for seq in list(self._running):
                self._end(seq, ErrorEvent(reason, 503, "unhealthy"), "error")
            with self._cond:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for h in waiting:
                self._end_waiting(h, ErrorEvent(reason, 503, "unhealthy"), "error")
            self._flush()
            log.info("engine loop stopped")

    def _iteration(self) -> None:
        t0 = time.monotonic()
        self._busy_iterations += 1
        if self._faults.crash_at == self._busy_iterations:
            raise RuntimeError("injected engine crash (fault_injection)")
        shutting = self._draining and t0 >= self._drain_deadline
        # 1. retire cancelled, expired (or, past the drain grace, all) running sequences
        for seq in list(self._running):
            h = seq.handle
            if h.cancelled:
                self._end(seq, None, "cancelled")
            elif shutting:
                self._end(seq, ErrorEvent("the server is shutting down", 503, "unhealthy"), "error")
            elif t0 >= h.deadline:
                self._end(seq, ErrorEvent(f"request timed out after {t0 - h.arrival:.1f}s", 504, "timeout"), "error")
        # 2. admit waiting requests into free slots
        stepping = [s for s in self._running if s.pending >= 0]  # not those still scoring their prompt
        admitted: list[_Sequence] = []
        with self._cond:
            while self._waiting and (self.decoder.state.free_slots > 0 or shutting):
                h = self._waiting.popleft()
                if h.cancelled:
                    self._end_waiting(h, None, "cancelled")
                elif shutting:
                    self._end_waiting(h, ErrorEvent("the server is shutting down", 503, "unhealthy"), "error")
                elif t0 >= h.deadline:
                    self._end_waiting(
                        h,
                        ErrorEvent(f"request timed out after {t0 - h.arrival:.1f}s in the queue", 504, "timeout"),
                        "error",
                    )
                elif (new := self._admit(h, t0)) is not None:
                    admitted.append(new)
        # 2b. requests that asked for prompt logprobs are scored first, a budget per iteration; then prefilled. Those
        # admitted just now are scored in this same call and may finish in it: each sequence is prefilled once.
        fresh = [s for s in admitted if s.scorer is None]  # nothing to score: prefill now
        ready, scored = self._score_prompts()  # prompts scored in full, now or over earlier iterations
        admitted = []
        for seq in fresh + ready:
            if seq.handle.request.max_new_tokens == 0:  # score only (or echo only): no prefill, no token
                fin = FinishEvent("length", 0, None, len(seq.handle.request.prompt_ids))
                self._end(seq, ScoreEvent(seq.prompt, fin), "length")
            else:
                admitted.append(seq)
        if not stepping and not admitted:
            if scored and self.on_step is not None:  # an iteration that only scored prompts: no step, no batch
                self.on_step(StepStats(0, 0, time.monotonic() - t0, 0, scored))
            return
        # 3. forward: one step call for the running rows, one prefill call for the admitted ones
        parts: list[torch.Tensor] = []
        rows: list[_Sequence] = []
        if stepping:
            self._steps += 1
            try:
                if self._steps in self._faults.fail_step:
                    raise RuntimeError("injected decode-step failure (fault_injection)")
                tokens = torch.tensor([s.pending for s in stepping], dtype=torch.long)
                parts.append(self.decoder.step([s.slot for s in stepping], tokens))  # (B, V)
                rows += stepping
            except Exception as e:
                log.exception("decode step failed for %d requests", len(stepping))
                for seq in stepping:
                    self._end(seq, ErrorEvent(f"decode step failed: {e}"), "error")
        prefilled = 0
        if admitted:
            try:
                parts.append(
                    self.decoder.prefill([s.slot for s in admitted], [s.handle.request.prompt_ids for s in admitted])
                )  # (P, V)
                rows += admitted
                prefilled = len(admitted)
            except Exception as e:
                log.exception("prefill failed for %d requests", len(admitted))
                for seq in admitted:
                    self._end(seq, ErrorEvent(f"prefill failed: {e}"), "error")
        generated = self._sample(rows, torch.cat(parts) if len(parts) > 1 else parts[0]) if rows else 0
        if self.on_step is not None:
            self.on_step(StepStats(len(rows), prefilled, time.monotonic() - t0, generated, scored))

    def _admit(self, h: RequestHandle, now: float) -> _Sequence | None:
        """Give a waiting request a slot and its per-sequence state; None (and an error event) if it cannot."""
        r = h.request
        try:
            sampler = SequenceSampler(r.params, r.prompt_ids, self.vocab_size, self.device)
            detok = IncrementalDetokenizer(self.tokenizer, r.prompt_ids)
            stopper = StopChecker(r.stop, self.tokenizer.eos_token_id, r.stop_token_ids, max(1, r.max_new_tokens))
        except Exception as e:  # handlers validate first; this only guards the loop against what slipped through
            log.exception("admission failed")
            self._end_waiting(h, ErrorEvent(f"invalid request: {e}", 422, "validation"), "error")
            return None
        seq = _Sequence(
            handle=h, slot=self.decoder.allocate(), admitted=now, sampler=sampler, detok=detok, stopper=stopper
        )
        if r.prompt_logprobs is not None:
            # choices of one request (OpenAI n > 1) share the prompt: score it once
            same = (
                s.scorer
                for s in self._running
                if s.scorer is not None
                and s.scorer.top_n == r.prompt_logprobs
                and s.handle.request.prompt_ids == r.prompt_ids
            )
            seq.scorer = next(same, None) or PromptScorer(
                self.decoder.model,
                torch.tensor(r.prompt_ids),
                r.prompt_logprobs,
                batch_size=SCORE_WINDOWS,
                head_chunk=SCORE_HEAD_CHUNK,
            )
        self._running.append(seq)
        return seq

    def _score_prompts(self) -> tuple[list[_Sequence], int]:
        """Advance prompt logprobs, oldest first, for about SCORE_BUDGET_S in all: (sequences done, tokens scored).

        A long prompt is scored over several iterations (O(prompt) work), so the running streams keep stepping.
        """
        done: list[_Sequence] = []
        start, chunks, scored = time.monotonic(), 0, 0
        for seq in list(self._running):
            scorer = seq.scorer
            if scorer is None:
                continue
            try:
                with torch.inference_mode():
                    while not scorer.done and (chunks == 0 or time.monotonic() - start < SCORE_BUDGET_S):
                        scored += scorer.advance()  # ends in .tolist(): timed right even on a GPU
                        chunks += 1
            except Exception as e:
                log.exception("prompt logprobs failed")
                self._end(seq, ErrorEvent(f"prompt logprobs failed: {e}"), "error")
                continue
            if scorer.done:
                seq.prompt, seq.scorer = scorer.result, None
                done.append(seq)
        return done, scored

    def _sample(self, rows: list[_Sequence], logits: torch.Tensor) -> int:
        """Sample, detokenize, stop-check and emit one token per row; returns the tokens emitted."""
        try:
            out = sample(logits, [s.sampler for s in rows])
            tokens = out.tokens.tolist()
            logprobs = out.logprobs.tolist()
            top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        except Exception as e:
            log.exception("sampling failed for %d requests", len(rows))
            for seq in rows:
                self._end(seq, ErrorEvent(f"sampling failed: {e}"), "error")
            return 0
        now = time.monotonic()
        emitted = 0
        for i, seq in enumerate(rows):
            try:
                self._emit_token(seq, tokens[i], logprobs[i], top_ids[i], top_lps[i], now)
                emitted += 1
            except Exception as e:
                log.exception("token handling failed")
                self._end(seq, ErrorEvent(f"token handling failed: {e}"), "error")
        return emitted

    def _emit_token(
        self, seq: _Sequence, tok: int, logprob: float, top_ids: list[int], top_lps: list[float], now: float
    ) -> None:
        seq.sampler.observe(tok)
        seq.generated += 1
        if seq.first_token is None:
            seq.first_token = now
        else:
            seq.inter_token.append(now - (seq.last_token or now))
        seq.last_token = now
        stop = seq.stopper
        text, emitted, reason = advance_token(seq.detok, stop, tok)
        if stop.is_stop_token(tok):
            text = self.tokenizer.id_to_token(tok)  # TGI shows a stop token's own text (e.g. "</s>")
        n = seq.sampler.params.top_n_tokens
        top = list(zip(top_ids[:n], top_lps[:n], strict=True))
        special = tok in self.special_ids or tok in stop.stop_token_ids
        fin = None
        if reason is not None:
            seed = seq.sampler.seed if seq.sampler.generator is not None else None
            fin = FinishEvent(reason, seq.generated, seed, len(seq.handle.request.prompt_ids))
        ev = TokenEvent(seq.generated - 1, tok, text, emitted, logprob, special, top, fin, seq.prompt)
        seq.prompt = None
        if fin is not None:
            self._end(seq, ev, fin.reason)
        else:
            self._send(seq.handle, ev)
            seq.pending = tok

    def _end(self, seq: _Sequence, ev: Event | None, reason: str) -> None:
        """Finish a running sequence: free its slot, send its last event, report its stats."""
        if seq in self._running:
            self._running.remove(seq)
            self.decoder.free(seq.slot)
        # stats first: a client that got its last event may read /metrics at once
        self._report(seq.handle, reason, seq.generated, seq.admitted, seq.first_token, seq.inter_token)
        if ev is not None:
            self._send(seq.handle, ev)
        else:
            seq.handle.done = True

    def _end_waiting(self, h: RequestHandle, ev: Event | None, reason: str) -> None:
        self._report(h, reason, 0, None, None, [])
        if ev is not None:
            self._send(h, ev)
        else:
            h.done = True

    def _send(self, h: RequestHandle, ev: Event) -> None:
        """Queue an event for its handler; the iteration's events cross to asyncio together, after its stats."""
        if is_last(ev):
            h.done = True
        with self._outbox_lock:
            self._outbox.append((h, ev))

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops: one wake-up per loop, after the iteration's stats were
        reported, so a client that has its last event reads metrics that include it."""
        with self._outbox_lock:
            batch, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        for h, ev in batch:
            by_loop.setdefault(h.loop, []).append((h, ev))
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver_all, events)

    def _report(
        self,
        h: RequestHandle,
        reason: str,
        generated: int,
        admitted: float | None,
        first_token: float | None,
        inter_token: list[float],
    ) -> None:
        # lengths and timings only: prompts and generated text are never logged
        log.debug(
            "request %d %s: %s, %d prompt tokens, %d generated, %.3fs",
            h.id,
            h.request.endpoint,
            reason,
            len(h.request.prompt_ids),
            generated,
            time.monotonic() - h.arrival,
        )
        if self.on_request is None:
            return
        now = time.monotonic()
        try:
            self.on_request(
                RequestStats(
                    endpoint=h.request.endpoint,
                    finish_reason=reason,
                    prompt_tokens=len(h.request.prompt_ids),
                    generated_tokens=generated,
                    queue_s=None if admitted is None else admitted - h.arrival,
                    ttft_s=None if first_token is None else first_token - h.arrival,
                    duration_s=now - h.arrival,
                    inter_token_s=inter_token,
                )
            )
        except Exception:  # metrics must never take the loop down
            log.exception("request stats callback failed")
