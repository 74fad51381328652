"""`--api-server-count N` (N > 1): N HTTP frontend processes share one port and one engine core process.

The supervisor (the `gam-serve` process) binds the port, starts the engine core, then N workers; each worker runs
uvicorn on the inherited socket with an app attached to the core (frontend index i, so the core routes each
request's output back to the worker that holds its connection). The kernel spreads connections over the workers.
Each worker has its own event loop and GIL for HTTP parsing, detokenization and SSE, which is what limits a
single frontend at high concurrency (bench/host.py measures 1 vs 2).

Lifetime: SIGTERM/SIGINT are forwarded to the workers, which drain as a single server does (the core stops admitting,
/health answers 503, streams finish within --shutdown-grace); when all have exited the core is shut down. If the
core dies, every worker fails its streams with a 503 and exits 1, and so does the supervisor; if a worker dies
unexpectedly, the others are drained and the supervisor exits 1: the orchestrator restarts the whole server.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from types import FrameType

import uvicorn
import zmq

from server import protocol as p
from server.settings import Settings

log = logging.getLogger(__name__)
CRASHED = 1


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    """The uvicorn settings every frontend runs with."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        timeout_keep_alive=settings.timeout_keep_alive,
    )


def _worker(settings: Settings, index: int, address: str, core_pid: int, sock: socket.socket) -> None:
    """A frontend worker process: uvicorn with an app attached to the engine core."""
    # its own process group: a terminal's Ctrl-C (or a group SIGTERM) reaches only the supervisor, which forwards it
    # once (two signals would skip the drain)
    os.setpgrp()
    from server.app import Attach, create_app
    from server.cli import DrainingServer

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, Attach(address, core_pid, index))
    server = DrainingServer(uvicorn_config(app, settings))
    server.run(sockets=[sock])
    if server.engine_crashed or not server.started:
        raise SystemExit(CRASHED)


def serve(settings: Settings) -> int:
    """Run the supervisor until the workers are gone; returns the exit status."""
    from server.engine import CoreProcess

    config = uvicorn_config(None, settings)
    sock = config.bind_socket()
    core = CoreProcess(settings)
    spawn = multiprocessing.get_context("spawn")
    workers = [
        spawn.Process(
            target=_worker,
            args=(settings, i, core.address, core.process.pid, sock),
            name=f"gam-frontend-{i}",
        )
        for i in range(settings.api_server_count)
    ]
    for w in workers:
        w.start()
    # the bound port, not settings.port: with --port 0 the kernel picked it
    log.info("%d frontends on %s:%d share the engine core (pid %s)", len(workers), settings.host,
             sock.getsockname()[1], core.process.pid)  # fmt: skip
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.is_alive() and w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    running = {w.sentinel: w for w in workers}
    core_alive = True
    while running:
        ready = multiprocessing.connection.wait([*running, core.process.sentinel] if core_alive else list(running))
        for s in ready:
            if s == core.process.sentinel:
                core_alive = False
                log.error("the engine core process exited with code %s", core.process.exitcode)
                status = CRASHED
                continue
            w = running.pop(s)  # type: ignore[arg-type]  # wait() returns the sentinels (ints) it was given
            w.join()
            if w.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                status = CRASHED
            if not stopping:  # a worker left on its own: drain the others, then exit 1
                log.error("%s exited with code %s: stopping the server", w.name, w.exitcode)
                status, stopping = CRASHED, True
                forward(signal.SIGTERM, None)
    _shutdown_core(core.address)
    core.stop(10.0)
    sock.close()
    return status


def _shutdown_core(address: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(address)
    s.send(p.encode([p.Shutdown()]))
    s.close()
    ctx.term()
