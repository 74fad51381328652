"""Preloaded by the multiprocessing forkserver that forks engine core processes (server/engine.py), never imported
by a frontend: the forkserver ignores SIGINT and SIGTERM, so a signal sent to the whole process group (Ctrl-C,
systemd's control-group stop, `timeout`) reaches the frontend, which drains, and not the forkserver, whose death
would take the core with it (the core asks for SIGKILL when its parent dies). The forkserver still exits when the
frontend does (its control pipe closes), and the core with it."""

from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

import server.core_process  # noqa: E402, F401  (torch and the model code, once, before any fork)
