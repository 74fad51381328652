"""`python -m load_tests.overload`: a burst of K x capacity at once against gam-serve (issue #7).

Capacity = max_batch_size + max_queue from GET /info. Sends K x capacity POST /generate requests at the same moment;
every answer must be 200 or 429 with Retry-After. Reports the p99 latency of the admitted requests beside the
latency of one full batch measured in the same run (median of 3), so the bound holds as a ratio on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter
from typing import Any

import httpx

from load_tests.runner import check_target, run


async def _timed(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str | None, float]:
    t0 = time.perf_counter()
    r = await client.post("/generate", json=body)
    return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - t0


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


async def overload(url: str, factor: float = 4.0, max_new_tokens: int = 16) -> dict[str, Any]:
    """One burst of factor x capacity; a JSON-able report with `ok`."""
    body = {"inputs": "The game was", "parameters": {"max_new_tokens": max_new_tokens}}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        info = (await client.get("/info")).json()
        batch, capacity = info["max_batch_size"], info["max_batch_size"] + info["max_queue"]
        full_batch = []
        for _ in range(3):
            rs = await asyncio.gather(*(_timed(client, body) for _ in range(batch)))
            full_batch.append(max(t for _, _, t in rs))
        n = math.ceil(factor * capacity)
        rs = await asyncio.gather(*(_timed(client, body) for _ in range(n)))
        healthy = (await client.get("/health")).status_code == 200
    codes = Counter(code for code, _, _ in rs)
    admitted = [t for code, _, t in rs if code == 200]
    batch_s = statistics.median(full_batch)
    report = {
        "capacity": capacity,
        "burst": n,
        "status_counts": dict(codes),
        "retry_after_on_every_429": all(ra is not None for code, ra, _ in rs if code == 429),
        "full_batch_s": batch_s,
        "admitted_p99_s": p99(admitted) if admitted else None,
        "admitted_p99_over_full_batch": p99(admitted) / batch_s if admitted else None,
        # a bounded queue serves the last admitted request after at most ceil(capacity / batch) batches
        "bound_in_batches": math.ceil(capacity / batch),
        "healthy_after": healthy,
    }
    report["ok"] = set(codes) <= {200, 429} and report["retry_after_on_every_429"] and healthy
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.overload", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--factor", type=float, default=4.0, help="burst size in multiples of capacity")
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args(argv)
    check_target(args.url)
    report = run(overload(args.url, args.factor, args.output_len))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
