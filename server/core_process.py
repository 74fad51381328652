"""The engine core process: loads the model, owns the slot pool and the Prometheus registry, and runs EngineCore.

Started by the frontend (server/engine.py) with multiprocessing; talks to it over a zmq ROUTER socket (protocol.py).
Its loop: take every message waiting on the socket (block while there is no work), answer them, run one engine
iteration, send its CoreOutput. So a cancellation frees its slot before the next step, a submission is answered
within one step, and the only per-token traffic is one message per step. The process has its own GIL and torch
threads; its comm name is `gam-engine-core` (ps, top, psutil); it ignores SIGINT/SIGTERM (the frontend drains and
stops it) and dies with its parent.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time

import zmq
from prometheus_client import generate_latest

from gam_model.checkpoint import load_checkpoint
from gam_model.decode import Decoder
from gam_model.quant import quantization_of
from server import protocol as p
from server.core import EngineCore, EngineUnavailable, QueueFull, ScoreBudget, TooManySequences
from server.heap import settle_heap
from server.metrics import Metrics
from server.settings import Settings
from server.version import VERSION

log = logging.getLogger("server.core")
PROCESS_NAME = "gam-engine-core"
IDLE_POLL_MS = 200  # while idle: how often it checks that its parent is still there
MAX_INPUTS_PER_STEP = 256  # messages handled between two steps at most (the rest wait for the next gap)


def _name_and_tie_to_parent() -> None:
    """Linux: set the comm name and ask for SIGKILL when the parent dies (no orphaned core holding the GPU)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, PROCESS_NAME.encode(), 0, 0, 0)  # PR_SET_NAME
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def main(settings: Settings, address: str, parent: int) -> None:
    """Process entry point: bind, load, serve until Shutdown (exit 0) or a crash (exit 1)."""
    _name_and_tie_to_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    # no high-water mark: past it a ROUTER drops messages silently, and a lost step is a stream that never ends;
    # a frontend that falls behind costs memory here instead (one message per step)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    code = 1
    try:
        try:
            core, metrics, facts = build(settings)
        except BaseException as e:
            log.exception("the engine core failed to start")
            _answer_hellos(sock, p.Failed(f"{type(e).__name__}: {e}"))
            return
        code = CoreServer(sock, core, metrics, facts, parent).run()
    finally:
        sock.close()
        zctx.term()
        sys.stdout.flush()
        os._exit(code)  # no atexit handlers of the parent's modules


def build(settings: Settings) -> tuple[EngineCore, Metrics, p.Facts]:
    """Load the checkpoint; the engine core over it and the metrics bound to it."""
    device = settings.resolved_device()
    model, tokenizer, meta = load_checkpoint(
        settings.resolved_model_dir(), device, settings.requested_dtype(), settings.quantize
    )
    dtype, quantization = model.pos_embedding.weight.dtype, quantization_of(model)  # the activations
    graphs = settings.cuda_graphs and device.type == "cuda"  # on CPU the replay stand-in is a test aid, no speed-up
    decoder = Decoder(
        model, settings.max_batch_size, device, dtype, cuda_graphs=graphs, deterministic=settings.deterministic
    )
    decoder.warmup()  # capture every bucket's graph up front (no-op without graphs)
    decoder.tune_threads()  # CPU: small batches on one thread where that is no slower (no-op on CUDA)
    core = EngineCore(
        decoder,
        tokenizer,
        max_queue=settings.max_queue,
        shutdown_grace=settings.shutdown_grace,
        fault_injection=settings.fault_injection,
        score_budget=ScoreBudget(settings.score_budget_s, settings.score_windows, settings.score_head_chunk),
        overlap=settings.resolved_overlap(),
    )
    facts = p.Facts(
        model_id=settings.model_id or meta.model_name,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization,
        device=device.type,
        num_params=model.config.num_params(),
        dtype_bytes=decoder.dtype.itemsize,
        state_bytes_per_sequence=decoder.state.bytes_per_sequence(),
        cuda_graphs=decoder.cuda_graphs,
        overlap=core.batch.overlap,
        created=int(time.time()),
    )
    metrics = Metrics()
    metrics.bind(core, facts.model_id, facts.dtype, facts.device, VERSION, quantization)
    log.info(
        "loaded %s: %d parameters, %s on %s, weights quantized: %s, cuda graphs: %s, overlap: %s",
        facts.model_id,
        facts.num_params,
        facts.dtype,
        device,
        quantization,
        decoder.cuda_graphs,
        facts.overlap,
    )
    return core, metrics, facts


def _answer_hellos(sock: zmq.Socket, msg: p.Failed, wait_s: float = 10.0) -> None:
    """Tell the frontends why the core could not start (each is waiting for Ready): every Hello for a while."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            ident, _ = sock.recv_multipart()
            sock.send_multipart([ident, p.encode(msg)])


class CoreServer:
    """The core's message loop around an EngineCore."""

    def __init__(self, sock: zmq.Socket, core: EngineCore, metrics: Metrics, facts: p.Facts, parent: int) -> None:
        self.sock = sock
        self.core = core
        self.metrics = metrics
        self.facts = facts
        self.parent = parent  # the frontend's pid
        self.parent_at_start = os.getppid()  # the forkserver (or the frontend itself)
        self.frontends: dict[int, bytes] = {}
        self.backlog: collections.deque[tuple[bytes, p.ToCore]] = collections.deque()  # received, not yet handled
        self.stopping = False
        self.drained_sent = False

    def run(self) -> int:
        """Serve until Shutdown; returns the exit code (1 if the loop died)."""
        log.info("engine core ready: %d slots on %s (pid %d)", self.core.max_batch_size, self.facts.device, os.getpid())
        settle_heap()
        try:
            while not self.stopping:
                self._inputs(block=not self.core.has_work)
                if self.stopping:
                    break
                if self.core.has_work:
                    self.core.iteration()
                    self._send(self.core.take_output())
            return 0
        except BaseException as e:
            log.exception("engine loop died")
            # the frontend turns unhealthy on this message, then fails what is in flight: a client that got its
            # error finds /health 503 (the process exit it also notices may come later)
            with contextlib.suppress(Exception):
                self._broadcast(p.Failed(f"the engine loop died: {e!r}"))
            return 1
        finally:
            if self.stopping:
                self.core.fail_all("the engine stopped")
                self._send(self.core.take_output())

    def _inputs(self, block: bool) -> None:
        """Handle every message waiting (waiting up to IDLE_POLL_MS for the first when idle), at most
        MAX_INPUTS_PER_STEP: a frontend's zmq message is a batch (what one turn of its event loop queued), counted per
        message in it; what is past the bound waits, in order, for the next gap."""
        backlog = self.backlog
        timeout = IDLE_POLL_MS if block and not backlog else 0
        changed = False
        budget = MAX_INPUTS_PER_STEP  # a flood of submissions or /metrics scrapes cannot hold the step back for long
        while budget:
            if not backlog:
                if not self.sock.poll(timeout):
                    break
                timeout = 0
                ident, raw = self.sock.recv_multipart()
                backlog.extend([(ident, msg) for msg in p.decode_to_core(raw)])
                continue
            ident, msg = backlog.popleft()
            budget -= 1
            changed |= self._handle(ident, msg)
        if changed:
            self._send(self.core.take_output(always=True))
        if block and not self._frontend_alive():
            log.error("the frontend process is gone: stopping")
            self.stopping = True

    def _frontend_alive(self) -> bool:
        """The frontend (pid given) still runs, and so does the process that forked this one (PDEATHSIG covers that
        on Linux; this the rest)."""
        if os.getppid() != self.parent_at_start:
            return False
        try:
            os.kill(self.parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def _handle(self, ident: bytes, msg: p.ToCore) -> bool:
        """Apply one message; True when the core's counts (or pending replies) changed."""
        if isinstance(msg, p.Submit):
            try:
                self.core.submit(msg.ids, msg.requests, msg.arrival, msg.deadline)
                self.core.reply(msg.frontend, msg.token, None)
            except (QueueFull, TooManySequences, EngineUnavailable, ValueError) as e:
                if isinstance(e, (QueueFull, EngineUnavailable)):
                    endpoint = msg.requests[0].endpoint if msg.requests else "generate"
                    self.metrics.count_rejected(endpoint, len(msg.requests))
                self.core.reply(msg.frontend, msg.token, e)
            return True
        if isinstance(msg, p.Cancel):
            self.core.cancel(msg.ids, "error" if msg.failed else "cancelled")
            return True
        if isinstance(msg, p.Hello):
            self.frontends[msg.frontend] = ident
            self.sock.send_multipart([ident, p.encode(p.Ready(self.facts))])
            return False
        if isinstance(msg, p.MetricsQuery):
            text = generate_latest(self.metrics.registry)
            self.sock.send_multipart([ident, p.encode(p.MetricsText(msg.token, text))])
            return False
        if isinstance(msg, p.Failure):
            self.metrics.count_failure(msg.endpoint, msg.error_type)
            return False
        if isinstance(msg, p.Drain):
            self.core.drain(msg.grace)
            return True
        if isinstance(msg, p.Shutdown):
            self.stopping = True
            return False
        raise TypeError(f"unexpected message {msg!r}")

    def _send(self, out: p.CoreOutput | None) -> None:
        if out is None:
            return
        for f, part in out.split(list(self.frontends)).items():
            if part.ids or part.errors or part.replies or part.scored or len(self.frontends) == 1:
                self.sock.send_multipart([self.frontends[f], p.encode(part)], copy=False)
        if self.core.draining and not self.core.has_work and not self.drained_sent:
            self.drained_sent = True
            self._broadcast(p.Drained())  # after every frontend's last output, on the same sockets

    def _broadcast(self, msg: p.Failed | p.Drained) -> None:
        """Send msg to every frontend."""
        raw = p.encode(msg)
        for ident in self.frontends.values():
            self.sock.send_multipart([ident, raw])
