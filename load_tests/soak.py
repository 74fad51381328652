"""`python -m load_tests.soak`: a closed-loop soak against gam-serve that also checks the server (issue #7).

Runs a scenario (default `reliability`: 10,000 requests, 32 streams, 10% cut mid-stream), half over TGI and half
over OpenAI streaming, after a warm-up; then reads the server's /metrics and reports leaked slots
(gam_requests_running + gam_requests_waiting once the run is over), 5xx answers or error events, and the growth
of the server's resident memory (process_resident_memory_bytes) from after the warm-up to the end.
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from load_tests.metrics import RequestRecord, summarize
from load_tests.runner import LoadConfig, check_target, resolve_model, run, run_load
from load_tests.scenarios import SCENARIOS

# stream error kinds gam-serve sends for server-side failures (TGI error_type / OpenAI error.type)
SERVER_ERROR_KINDS = ("generation", "unhealthy", "timeout", "server_error")


@dataclasses.dataclass
class ServerSample:
    """What /metrics says at one moment."""

    running: float
    waiting: float
    rss_bytes: float | None
    finished: dict[str, float]  # gam_requests_total summed over endpoints, by finish_reason


def parse_metrics(text: str) -> ServerSample:
    """The soak-relevant values of a Prometheus text exposition."""
    running = waiting = 0.0
    rss: float | None = None
    finished: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "gam_requests_running":
                running = s.value
            elif s.name == "gam_requests_waiting":
                waiting = s.value
            elif s.name == "process_resident_memory_bytes":
                rss = s.value
            elif s.name == "gam_requests_total":
                reason = s.labels["finish_reason"]
                finished[reason] = finished.get(reason, 0.0) + s.value
    return ServerSample(running, waiting, rss, finished)


async def scrape(client: httpx.AsyncClient) -> ServerSample:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


async def settle(client: httpx.AsyncClient, timeout_s: float) -> ServerSample:
    """Wait until nothing runs or waits (cancelled slots are freed within a step), or timeout_s; the last sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await scrape(client)
        if (s.running == 0 and s.waiting == 0) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.1)


def is_server_error(r: RequestRecord) -> bool:
    """A 5xx answer or a server-side error event in the stream."""
    if r.status is not None and r.status >= 500:
        return True
    return r.error is not None and r.error.startswith("stream:") and r.error.split(":", 1)[1] in SERVER_ERROR_KINDS


async def soak(
    cfg: LoadConfig,
    apis: tuple[str, ...] = ("tgi", "openai"),
    warmup: int | None = None,
    settle_s: float = 10.0,
    max_rss_growth: float = 0.05,
    progress: bool = False,
) -> dict[str, Any]:
    """Run cfg split over `apis` (requests and streams shared out), then check the server; a JSON-able report."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=30) as client:
        model = cfg.model or (await resolve_model(cfg.url, cfg.api_key) if "openai" in apis else None)
        base = dataclasses.replace(cfg, model=model)
        n_warm = 2 * cfg.concurrency if warmup is None else warmup
        if n_warm:  # allocator arenas, buffers and caches settle before the RSS baseline
            await run_load(dataclasses.replace(base, num_requests=n_warm, disconnect_fraction=0.0), progress=False)
        before = await settle(client, settle_s)
        k = len(apis)
        runs = [
            dataclasses.replace(
                base,
                api=api,
                concurrency=max(1, cfg.concurrency // k),
                num_requests=cfg.num_requests // k + (i < cfg.num_requests % k),
                seed=cfg.seed + i,
            )
            for i, api in enumerate(apis)
        ]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run_load(r, progress=progress) for r in runs))
        duration = time.perf_counter() - t0
        after = await settle(client, settle_s)
    records = [rec for res in results for rec in res.records]
    failed = [
        {"api": res.config.api, "error": r.error, "status": r.status, "tokens": len(r.token_times), "s": r.start - t0}
        for res in results
        for r in res.records
        if r.error is not None
    ]
    summary = summarize(records, duration)
    server_errors = sum(is_server_error(r) for r in records)
    other_errors = sum(r.error is not None and not is_server_error(r) for r in records)
    rss_growth = (
        (after.rss_bytes - before.rss_bytes) / before.rss_bytes
        if after.rss_bytes is not None and before.rss_bytes
        else None
    )
    cancelled = after.finished.get("cancelled", 0.0) - before.finished.get("cancelled", 0.0)
    leaked = after.running + after.waiting
    checks = {
        "no_leaked_slots": leaked == 0,
        "no_5xx": server_errors == 0,
        "no_other_errors": other_errors == 0,
        "rss_growth_ok": rss_growth is not None and rss_growth < max_rss_growth,
    }
    return {
        "apis": list(apis),
        "requests": len(records),
        "completed": summary["completed"],
        "disconnected": summary["disconnected"],
        "server_cancelled": cancelled,
        "server_5xx": server_errors,
        "other_errors": other_errors,
        "errors": summary["errors"],
        "leaked_slots": leaked,
        "rss_before_mib": None if before.rss_bytes is None else before.rss_bytes / 2**20,
        "rss_after_mib": None if after.rss_bytes is None else after.rss_bytes / 2**20,
        "rss_growth": rss_growth,
        "max_rss_growth": max_rss_growth,
        "duration_s": duration,
        "request_throughput": summary["request_throughput"],
        "e2el_p99_ms": summary["e2el"]["p99_ms"],
        "ttft_p99_ms": summary["ttft"]["p99_ms"],
        "failed_samples": failed[:20],
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--scenario", default="reliability", choices=sorted(SCENARIOS))
    p.add_argument("--api", choices=["tgi", "openai", "both"], default="both")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--input-len", type=int)
    p.add_argument("--disconnect-fraction", type=float)
    p.add_argument("--warmup", type=int, help="requests before the RSS baseline (default 2 x concurrency)")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--model")
    p.add_argument("--api-key")
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    preset = dict(SCENARIOS[args.scenario])
    preset.pop("rate", None)
    for flag, name in (
        ("num_requests", "num_requests"),
        ("concurrency", "concurrency"),
        ("output_len", "output_tokens"),
        ("input_len", "input_words"),
        ("disconnect_fraction", "disconnect_fraction"),
    ):
        if getattr(args, flag) is not None:
            preset[name] = getattr(args, flag)
    cfg = LoadConfig(url=args.url, model=args.model, api_key=args.api_key, **preset)
    cfg.validate()
    check_target(cfg.url)
    apis = ("tgi", "openai") if args.api == "both" else (args.api,)
    report = run(soak(cfg, apis, warmup=args.warmup, max_rss_growth=args.max_rss_growth, progress=args.progress))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
