"""Container health probe: exit 0 when gam-serve's /health answers 200, else 1 (stdlib only, no curl in the image)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# the image's ENTRYPOINT is gam-serve in exec form, so it is PID 1 and its command line holds the flags given after
# the image name (`docker run ... gam-serve --port 9000`); with `docker run --init` (compose `init: true`) PID 1 is
# the init (docker-init, tini), whose command line is its own options, then gam-serve's
PID1_CMDLINE = Path("/proc/1/cmdline")

# a wildcard bind answers on loopback, probed in the wildcard's family: `::` on ::1, since with one frontend uvicorn
# binds through asyncio's create_server, which sets IPV6_V6ONLY on an IPv6 socket (127.0.0.1 would be refused there)
WILDCARD_PROBES = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def flag(name: str) -> str | None:
    """The value of gam-serve's `name` flag (lower case) on PID 1's command line (`name VALUE` or `name=VALUE`, the
    name in any case; the last one wins, as in gam-serve's argparse), or None when it is not given."""
    try:
        args = PID1_CMDLINE.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        args = []
    # gam-serve's own arguments: those after its script (its interpreter, then the script, or an init's arguments
    # first); none when PID 1 runs no gam-serve
    start = next((i + 1 for i, a in enumerate(args) if Path(a).name == "gam-serve"), len(args))
    found = None
    for i, a in enumerate(args[start:], start):
        # gam-serve's flag names are case-insensitive (`--HOST`, `--Port=9000`: pydantic-settings lowercases them)
        option, eq, value = a.partition("=")
        if option.lower() != name:
            continue
        if eq:
            found = value
        elif i + 1 < len(args):
            found = args[i + 1]
    return found


def env(name: str) -> str | None:
    """The GAM_* variable `name` as gam-serve reads it: its name in any case (`gam_host`), the last one in the
    environment winning when several spellings are set (pydantic-settings' lowercased mapping of os.environ)."""
    found = None
    for key, value in os.environ.items():
        if key.upper() == name:
            found = value
    return found


def port() -> str:
    """The port gam-serve listens on: its --port flag, else GAM_PORT, else 8000."""
    # an int to gam-serve, which strips the whitespace around it (`--port " 9000"`)
    return (flag("--port") or env("GAM_PORT") or "8000").strip()


def host() -> str:
    """The address to probe, as it goes in a URL: gam-serve's --host flag, else GAM_HOST, else 127.0.0.1; a wildcard
    (0.0.0.0, "", ::) as loopback of its family, an IPv6 literal in brackets, a name as it is."""
    given = flag("--host")
    if given is None:  # `--host ""` (every interface) is given, not absent
        given = env("GAM_HOST")
        given = "127.0.0.1" if given is None else given
    address = WILDCARD_PROBES.get(given, given)
    return f"[{address}]" if ":" in address else address


def main() -> int:
    """Probe http://HOST:PORT/health once (HOST and PORT: see `host` and `port`)."""
    url = f"http://{host()}:{port()}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:  # under HEALTHCHECK --timeout=5s
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:  # HTTPError (503 while loading or draining) is a URLError
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
