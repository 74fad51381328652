"""Container health probe: exit 0 when gam-serve's /health answers 200, else 1 (stdlib only, no curl in the image)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Probe http://127.0.0.1:$GAM_PORT/health (default port 8000) once."""
    url = f"http://127.0.0.1:{os.environ.get('GAM_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:  # under HEALTHCHECK --timeout=5s
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:  # HTTPError (503 while loading or draining) is a URLError
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
