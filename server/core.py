"""The engine core: queue, admission, deadlines, prompt logprobs and stats around the batch core (gam_model.batch).

Synchronous and single-threaded: server/core_process.py runs it in its own process (its own GIL and torch threads)
and feeds it the frontends' messages between iterations. Each `iteration()`:
  1. ends requests past their deadline (or, past the drain grace, all of them);
  2. admits waiting requests into free slots; a request that asked for prompt logprobs is first scored, about
     the score budget of work per iteration, then handed to the batch core;
  3. runs one batch-core step (step the running rows, prefill the admitted ones, sample, finish checks);
  4. appends the step's results as columns to the output the process sends, after reporting its stats (so a client
     that got its last token reads metrics that include it).
Cancellations are applied when they arrive, between iterations: the slot is free before the next step.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gam_model.batch import BatchCore, SequenceSpec, StepOutput
from gam_model.decode import Decoder
from gam_model.scoring import PromptScorer, TokenLogprobs
from gam_model.tokenizer import Tokenizer
from server.protocol import CoreOutput, Error, Finish, GenerationRequest, Reply

log = logging.getLogger(__name__)


@dataclass
class ScoreBudget:
    """Prompt logprobs: each engine iteration scores prompt chunks for about `seconds` (at least one chunk) before
    its decode step, so running streams keep flowing. A chunk is `head_chunk` positions below block_size (one forward
    each) or `windows` R-token windows past it. (Bundled model on the 2-core dev CPU: 32 windows take about 35 ms;
    scoring 256 windows, or the whole 1024-position head, per iteration left a concurrent stream 0.3 s gaps between
    tokens.) Set by Settings (--score-budget-s, --score-windows, --score-head-chunk)."""

    seconds: float
    windows: int
    head_chunk: int


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue; the client should retry later (429)."""


class TooManySequences(ValueError):
    """A request with more sequences than the server can ever hold at once (slots + queue): retrying cannot help."""


def check_sequence_count(count: int, max_batch_size: int, max_queue: int) -> None:
    """TooManySequences when a call's `count` sequences could never run or wait at once (slots + queue)."""
    limit = max_batch_size + max_queue
    if count > limit:
        raise TooManySequences(
            f"the request asks for {count} sequences (prompts x n); this server runs and queues at most "
            f"{limit} at once (max batch size {max_batch_size} + max queue {max_queue})"
        )


class EngineUnavailable(RuntimeError):
    """The engine is draining for shutdown or has died (503)."""


# -- plain stats the metrics module maps onto Prometheus ---------------------------------------------------
@dataclass
class StepStats:
    """One engine iteration: rows sampled, of which newly prefilled, and where its wall time went."""

    batch_size: int
    prefilled: int
    duration_s: float
    generated_tokens: int
    scored_tokens: int = 0  # prompt tokens scored for prompt logprobs in this iteration
    itl_s: float = 0.0  # the inter-token latency of every row that was already running (all got a token at once)
    itl_rows: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0


@dataclass
class RequestStats:
    """One finished request (any outcome)."""

    endpoint: str
    finish_reason: str  # length, eos_token, stop_sequence, cancelled, error, rejected
    prompt_tokens: int
    generated_tokens: int
    queue_s: float | None
    ttft_s: float | None
    duration_s: float


class Faults:
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


@dataclass(eq=False)
class _Req:
    id: int
    request: GenerationRequest
    arrival: float
    deadline: float
    admitted: float | None = None
    first_token: float | None = None
    scorer: PromptScorer | None = None  # while its prompt logprobs are computed (before prefill)
    prompt: TokenLogprobs | None = None  # prompt logprobs, until they go out with its first token


@dataclass
class _Outbox:
    """CoreOutput under construction: the columns of this iteration's step, and the per-request extras."""

    step: StepOutput | None = None  # one step per iteration, one iteration per output
    finished: dict[int, Finish] = field(default_factory=dict)  # row of the step -> how its request ended
    prompts: dict[int, TokenLogprobs] = field(default_factory=dict)
    scored: list[int] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.step is not None or self.scored or self.errors or self.replies)


class EngineCore:
    """Continuous batching over one Decoder; `submit`/`cancel`/`drain` are its inputs, `take_output` its output."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: Tokenizer,
        *,
        max_queue: int,
        shutdown_grace: float = 10.0,
        fault_injection: str | None = None,
        score_budget: ScoreBudget,
        overlap: bool | None = None,
    ) -> None:
        self.decoder = decoder
        self.score_budget = score_budget
        self.batch = BatchCore(decoder, tokenizer, overlap=overlap)
        self.max_batch_size = decoder.state.num_slots
        self.max_queue = max_queue
        self.shutdown_grace = shutdown_grace
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_request: Callable[[RequestStats], None] | None = None
        self.faults = Faults(fault_injection)
        self.batch.before_step = self._before_step
        self._waiting: collections.deque[_Req] = collections.deque()
        self._scoring: list[_Req] = []  # admitted, holding a slot's place while their prompt is scored
        self._running: dict[int, _Req] = {}  # in the batch core
        self._steps = 0
        self._busy_iterations = 0
        self._last_sample = 0.0
        self._next_deadline = float("inf")
        self.draining = False
        self._drain_deadline = float("inf")
        self._out = _Outbox()

    # -- counts --------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._scoring)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        """Slots neither running nor held by a request whose prompt is being scored."""
        return self.batch.free_slots - len(self._scoring)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._scoring or self._running)

    # -- inputs --------------------------------------------------------------------------------------------
    def submit(self, ids: list[int], requests: list[GenerationRequest], arrival: float, deadline: float) -> None:
        """Queue every request or none (the choices of one API call). Raises TooManySequences when they could never
        fit (more than slots + queue), QueueFull when they do not fit now, EngineUnavailable while draining,
        ValueError for a request the engine cannot run."""
        if self.draining:
            raise EngineUnavailable("the server is shutting down")
        for r in requests:
            r.validate()
        check_sequence_count(len(requests), self.max_batch_size, self.max_queue)
        if len(self._waiting) + len(requests) > self.max_queue + self.free_slots:
            raise QueueFull(
                f"{len(self._waiting)} requests are waiting (max queue {self.max_queue}); "
                f"{len(requests)} more do not fit now"
            )
        self._waiting.extend(_Req(i, r, arrival, deadline) for i, r in zip(ids, requests, strict=True))
        self._next_deadline = min(self._next_deadline, deadline)  # a queued request ends at its deadline too

    def reply(self, frontend: int, token: int, error: BaseException | None) -> None:
        """Answer a Submit (with the exception it raised, if any)."""
        if error is None:
            self._out.replies.append(Reply(frontend, token))
        else:
            self._out.replies.append(Reply(frontend, token, type(error).__name__, str(error)))

    def cancel(self, ids: list[int], reason: str = "cancelled") -> None:
        """The frontend dropped these requests (client gone; `reason` "error": the frontend failed them): free their
        slots now; no event goes back."""
        gone = set(ids)
        for r in [r for r in self._waiting if r.id in gone]:
            self._waiting.remove(r)
            self._end_request(r, reason, 0)
        for r in [r for r in self._scoring if r.id in gone]:
            self._scoring.remove(r)
            self._end_request(r, reason, 0)
        for i in gone & self._running.keys():
            self._end_request(self._running.pop(i), reason, self.batch.remove(i))

    def drain(self, grace: float | None = None) -> None:
        """Stop admitting new requests; requests still running after `grace` seconds are ended (calling it again
        can shorten the grace, never extend it)."""
        deadline = time.monotonic() + (self.shutdown_grace if grace is None else grace)
        if not self.draining:
            self.draining = True
            log.info("draining: %d running, %d waiting", self.num_running, self.num_waiting)
        self._drain_deadline = min(self._drain_deadline, deadline)

    def fail_all(self, message: str) -> None:
        """End every request with a 503 (the core is stopping)."""
        for r in list(self._waiting) + self._scoring:
            self._fail(r, message, 503, "unhealthy", 0)
        self._waiting.clear()
        self._scoring.clear()
        for i, r in list(self._running.items()):
            self._fail(r, message, 503, "unhealthy", self.batch.remove(i))
        self._running.clear()

    # -- output --------------------------------------------------------------------------------------------
    def take_output(self, always: bool = False) -> CoreOutput | None:
        """What happened since the last call, as one message with the counts after it (None if nothing happened,
        unless `always`: after inputs that changed the counts)."""
        out, self._out = self._out, _Outbox()
        if not out and not always:
            return None
        msg = CoreOutput(
            prompts=out.prompts,
            scored=out.scored,
            errors=out.errors,
            replies=out.replies,
            running=self.num_running,
            waiting=self.num_waiting,
            free_slots=self.free_slots,
        )
        if (s := out.step) is not None:
            msg.ids, msg.tokens, msg.logprobs = s.keys.tobytes(), s.tokens.tobytes(), s.logprobs.tobytes()
            msg.top, msg.finished = s.top, out.finished
        return msg

    # -- the iteration -------------------------------------------------------------------------------------
    def _before_step(self) -> None:
        self._steps += 1
        if self._steps in self.faults.fail_step:
            raise RuntimeError("injected decode-step failure (fault_injection)")

    def iteration(self) -> None:
        t0 = time.monotonic()
        self._busy_iterations += 1
        if self.faults.crash_at == self._busy_iterations:
            raise RuntimeError("injected engine crash (fault_injection)")
        # 1. deadlines (or, past the drain grace, everything)
        if self.draining and t0 >= self._drain_deadline:
            self.fail_all("the server is shutting down")
            return
        if t0 >= self._next_deadline:
            self._expire(t0)
        # 2. admit waiting requests into free slots (requests that asked for prompt logprobs are scored first)
        while self._waiting and self.free_slots > 0:
            r = self._waiting.popleft()  # within its deadline: _expire ended the queued ones past it
            r.admitted = t0
            if r.request.max_new_tokens == 0 and r.request.prompt_logprobs is None:  # echo only: nothing to run
                self._out.scored.append(r.id)
                self._end_request(r, "length", 0)
            elif r.request.prompt_logprobs is not None:
                self._scoring.append(r)
                self._start_scoring(r)
            else:
                self._add(r)
        scored = self._score_prompts() if self._scoring else 0
        # 3. one batch-core step
        if not len(self.batch):
            if scored and self.on_step is not None:  # an iteration that only scored prompts: no step, no batch
                self.on_step(StepStats(0, 0, time.monotonic() - t0, 0, scored))
            return
        out = self.batch.step()
        now = time.monotonic()
        rows = len(out.keys)
        if rows:
            keys = out.keys.tolist()
            # first tokens (prefilled in the step collected), before the failures below: a request whose token came
            # and whose next step failed (with overlap, in the same call) gets its prompt logprobs with that token
            for i in range(out.stepped, rows):
                first = self._running[keys[i]]
                first.first_token = now
                if first.prompt is not None:
                    self._out.prompts[first.id], first.prompt = first.prompt, None
            for row, f in out.finished.items():
                greedy = self._running[keys[row]].request.params.greedy
                self._out.finished[row] = Finish(f.reason, f.generated, None if greedy else f.seed)
            self._out.step = out
        for key, message in out.failed:
            self._fail(self._running.pop(key), message, 500, "generation", 0)
        itl = now - self._last_sample if out.stepped else 0.0
        self._last_sample = now
        # stats before the output is sent: a client that has its last token reads metrics that include it
        if self.on_step is not None:
            self.on_step(
                StepStats(rows, out.prefilled, now - t0, rows, scored, itl, out.stepped, out.forward_s, out.sample_s)
            )
        for row, fin in out.finished.items():
            self._end_request(self._running.pop(keys[row]), fin.reason, fin.generated)

    def _add(self, r: _Req) -> None:
        """Hand an admitted request to the batch core (prefilled by its next step)."""
        q = r.request
        try:
            self.batch.add(r.id, SequenceSpec(q.prompt_ids, q.params, q.max_new_tokens, q.stop, q.stop_token_ids))
        except Exception as e:  # handlers validate first; this only guards the loop against what slipped through
            log.exception("admission failed")
            self._fail(r, f"invalid request: {e}", 422, "validation", 0)
            return
        self._running[r.id] = r

    def _start_scoring(self, r: _Req) -> None:
        q = r.request
        # choices of one request (OpenAI n > 1) share the prompt: score it once
        same = (
            s.scorer
            for s in self._scoring
            if s.scorer is not None and s.scorer.top_n == q.prompt_logprobs and s.request.prompt_ids == q.prompt_ids
        )
        r.scorer = next(same, None) or PromptScorer(
            self.decoder.model,
            torch.tensor(q.prompt_ids),
            q.prompt_logprobs or 0,
            batch_size=self.score_budget.windows,
            head_chunk=self.score_budget.head_chunk,
        )

    def _score_prompts(self) -> int:
        """Advance prompt logprobs, oldest first, for about the score budget in all; returns the tokens scored.

        A long prompt is scored over several iterations (O(prompt) work), so the running streams keep stepping.
        Scored requests go to the batch core (or, with max_new_tokens 0, end with their score).
        """
        start, chunks, scored, budget = time.monotonic(), 0, 0, self.score_budget.seconds
        self.decoder.all_threads()  # O(prompt) window batches: not on the one thread a small step leaves (CPU)
        for r in list(self._scoring):
            scorer = r.scorer
            assert scorer is not None
            try:
                with torch.inference_mode():
                    while not scorer.done and (chunks == 0 or time.monotonic() - start < budget):
                        scored += scorer.advance()  # ends in .tolist(): timed right even on a GPU
                        chunks += 1
            except Exception as e:
                log.exception("prompt logprobs failed")
                self._scoring.remove(r)
                self._fail(r, f"prompt logprobs failed: {e}", 500, "generation", 0)
                continue
            if not scorer.done:
                continue
            self._scoring.remove(r)
            r.prompt, r.scorer = scorer.result, None
            if r.request.max_new_tokens == 0:  # score only (or echo only): no prefill, no token
                self._out.prompts[r.id], r.prompt = r.prompt, None
                self._out.scored.append(r.id)
                self._end_request(r, "length", 0)
            else:
                self._add(r)
        return scored

    def _expire(self, now: float) -> None:
        """End the requests past their deadline, queued or admitted; the next deadline to look at again."""
        nxt = float("inf")
        # queued ones too, not only at admission: the requests ahead of them may hold the slots past their deadline
        kept: collections.deque[_Req] = collections.deque()
        for r in self._waiting:
            if now >= r.deadline:
                self._fail(r, f"request timed out after {now - r.arrival:.1f}s in the queue", 504, "timeout", 0)
            else:
                kept.append(r)
                nxt = min(nxt, r.deadline)
        self._waiting = kept
        for r in self._scoring + list(self._running.values()):
            if now >= r.deadline:
                msg = f"request timed out after {now - r.arrival:.1f}s"
                if r in self._scoring:
                    self._scoring.remove(r)
                    self._fail(r, msg, 504, "timeout", 0)
                else:
                    del self._running[r.id]
                    self._fail(r, msg, 504, "timeout", self.batch.remove(r.id))
            else:
                nxt = min(nxt, r.deadline)
        self._next_deadline = nxt

    def _fail(self, r: _Req, message: str, status: int, kind: str, generated: int) -> None:
        self._end_request(r, "error", generated)
        self._out.errors.append(Error(r.id, message, status, kind))

    def _end_request(self, r: _Req, reason: str, generated: int) -> None:
        """Report one finished request's stats (lengths and timings only: prompts and text are never logged)."""
        now = time.monotonic()
        q = r.request
        log.debug(
            "request %d %s: %s, %d prompt tokens, %d generated", r.id, q.endpoint, reason, len(q.prompt_ids), generated
        )
        if self.on_request is None:
            return
        try:
            self.on_request(
                RequestStats(
                    endpoint=q.endpoint,
                    finish_reason=reason,
                    prompt_tokens=len(q.prompt_ids),
                    generated_tokens=generated,
                    queue_s=None if r.admitted is None else r.admitted - r.arrival,
                    ttft_s=None if r.first_token is None else r.first_token - r.arrival,
                    duration_s=now - r.arrival,
                )
            )
        except Exception:  # metrics must never take the loop down
            log.exception("request stats callback failed")
