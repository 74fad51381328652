"""`gam-serve`: flags generated from server.settings.Settings, then uvicorn with a draining SIGTERM."""

from __future__ import annotations

import logging
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsConfigDict

from gam_model.checkpoint import CheckpointError, read_config
from gam_model.quant import QuantizationError, resolve
from server.settings import Settings


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


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that tells the engine to stop admitting the moment SIGTERM/SIGINT arrives."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = getattr(getattr(self.config.app, "state", None), "engine", None)
        if engine is not None:
            engine.drain()
        super().handle_exit(sig, frame)


def parse(argv: list[str] | None = None) -> Settings:
    """Parse argv (+ GAM_* env) into Settings."""
    cli = CliApp.run(CliSettings, cli_args=sys.argv[1:] if argv is None else argv)
    return Settings.model_validate(cli.model_dump())


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gam-serve`."""
    try:
        settings = parse(argv)
        model_dir = settings.resolved_model_dir()
        # bad combinations (fp8 on a CPU, a pre-quantized checkpoint with another dtype) fail here, before uvicorn
        resolve(
            settings.quantize,
            read_config(model_dir)[1].quantization,
            settings.requested_dtype(),
            settings.resolved_device(),
        )
    except (ValidationError, CheckpointError, QuantizationError) as e:
        print(f"gam-serve: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app  # imported late: `gam-serve --help` stays fast

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        timeout_keep_alive=settings.timeout_keep_alive,
    )
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
