"""`gam-serve`: flags generated from server.settings.Settings, then uvicorn with a draining SIGTERM."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsConfigDict

from gam_model.checkpoint import CheckpointError, load_tokenizer, read_config
from gam_model.quant import QuantizationError, resolve
from server.heap import settle_heap
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine import Engine


class CliSettings(Settings):
    """Settings parsed from argv (kebab-case flags, --flag/--no-flag booleans) on top of env and defaults."""

    model_config = SettingsConfigDict(
        cli_prog_name="gam-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=False,
    )


def describe(e: Exception) -> str:
    """A start-up error for stderr. Bad settings are named with what is wrong but not the values given: pydantic's
    own text quotes its input (for an error of the whole object, every flag and GAM_* variable, the API key too)."""
    if not isinstance(e, ValidationError):
        return str(e)
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    return "bad settings: " + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'settings'}: {x['msg']}" for x in errors)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains before it stops listening.

    On the first SIGTERM/SIGINT the engine stops admitting (new requests and /health answer 503, so probes and load
    balancers see the server leave) while the socket stays open and running streams finish, up to --shutdown-grace
    (then the engine ends the rest with a final error event). Only when the engine is idle does uvicorn's own shutdown
    start: close the listeners, wait for connections. A second signal skips the rest of the drain.

    If the engine core process dies, in-flight requests have already failed with a 503 and /health says so; the
    server then stops listening and `gam-serve` exits with status 1, so the orchestrator (Kubernetes, compose,
    systemd) restarts it with a fresh core. Restarting the core in place would hide the crash from those.
    """

    _draining = False
    _drain_until = 0.0
    engine_crashed = False  # set when the engine core died: main() exits 1 (the orchestrator restarts the server)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        settle_heap()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = self._engine()
        if engine is None or self._draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # the core ends what still runs at the grace; past it (and a margin) stop waiting whatever the counts say
        self._drain_until = time.monotonic() + engine.settings.shutdown_grace + 5.0
        engine.drain()

    async def on_tick(self, counter: int) -> bool:
        engine = self._engine()
        if engine is not None and engine.crashed and not self.should_exit:
            logging.getLogger(__name__).error("%s: stopping the server (exit status 1)", engine.crashed)
            self.engine_crashed = self.should_exit = True
        drained = engine is None or engine.drained or time.monotonic() > self._drain_until
        if self._draining and not self.should_exit and drained:
            # stop as uvicorn's own handler would, but without recording the signal: uvicorn re-raises the signals
            # it recorded once it has stopped, and the process would die of its SIGTERM (status 143) after a
            # completed drain, where N frontends' supervisor exits 0. A drained server exits 0; a second signal
            # (the rest of the drain skipped) still goes to uvicorn's handler and ends the process by that signal
            self.should_exit = True
        return await super().on_tick(counter)

    def _engine(self) -> Engine | None:
        return getattr(getattr(self.config.app, "state", None), "engine", None)


def _unrecognized(message: str) -> str:
    """argparse's usage error with the values of unrecognized arguments left out: it quotes every one, so a mistyped
    flag's value (`--api_key=KEY`, `--apikey KEY`) went into stderr (the container log); flag names stay."""

    def names(m: re.Match[str]) -> str:
        shown = [
            a.split("=", 1)[0] + ("=..." if "=" in a else "") if a.startswith("-") else "..." for a in m[1].split()
        ]
        return "unrecognized arguments: " + " ".join(shown)

    return re.sub(r"unrecognized arguments: (.*)", names, message)


def parse(argv: list[str] | None = None) -> Settings:
    """Parse argv (+ GAM_* env) into Settings."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # argparse writes its usage errors to sys.stderr, then exits 2
            cli = CliApp.run(CliSettings, cli_args=sys.argv[1:] if argv is None else argv)
    finally:
        sys.stderr.write(_unrecognized(err.getvalue()))
    return Settings.model_validate(cli.model_dump())


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gam-serve`."""
    try:
        settings = parse(argv)
        model_dir = settings.resolved_model_dir()
        config, meta = read_config(model_dir)
        # bad combinations (fp8 on a CPU, a pre-quantized checkpoint with another dtype) and a missing or unreadable
        # tokenizer (which each frontend reads) fail here, before uvicorn
        resolve(settings.quantize, meta.quantization, settings.requested_dtype(), settings.resolved_device())
        load_tokenizer(model_dir, config, meta)
    except (ValidationError, CheckpointError, QuantizationError) as e:
        print(f"gam-serve: {describe(e)}", file=sys.stderr)
        raise SystemExit(2) from e
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # imported late: `gam-serve --help` stays fast
    from server import frontends
    from server.app import create_app

    if settings.api_server_count > 1:
        raise SystemExit(frontends.serve(settings))
    server = DrainingServer(frontends.uvicorn_config(create_app(settings), settings))
    server.run()
    if server.engine_crashed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
