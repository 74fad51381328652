"""`python -m load_tests`: run a named scenario (with overrides) against a TGI or OpenAI streaming endpoint."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from load_tests.metrics import parse_goodput, summarize
from load_tests.report import document, table, write
from load_tests.runner import (
    CLIENTS,
    LoadConfig,
    RemoteTargetError,
    check_target,
    health,
    resolve_model,
    run,
    run_load,
)
from load_tests.scenarios import SCENARIOS

# flag -> LoadConfig field, for the overrides shared by every scenario
FLAGS = {
    "mode": "mode",
    "concurrency": "concurrency",
    "burstiness": "burstiness",
    "num_requests": "num_requests",
    "duration": "duration_s",
    "drain": "drain_s",
    "timeout": "timeout_s",
    "input_len": "input_words",
    "output_len": "output_tokens",
    "disconnect_fraction": "disconnect_fraction",
    "disconnect_within": "disconnect_within",
    "temperature": "temperature",
    "seed": "seed",
    "prompts": "prompts",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument(
        "--api",
        choices=["tgi", "openai"],
        default="tgi",
        help="tgi: POST /generate_stream; openai: POST /v1/completions with stream=true",
    )
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default="httpx",
        help="httpx, or raw: a lean asyncio + httptools client (http:// only) using a few times less CPU per token",
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="smoke", help="preset; flags below override it")
    p.add_argument("--mode", choices=["closed", "open"], help="closed: N concurrent streams; open: arrivals at --rate")
    p.add_argument("--concurrency", type=int, help="closed: streams; open: cap on requests in flight (0 = none)")
    p.add_argument("--rate", help="open loop requests/s, or 'Nx' = N times the capacity a calibration run measures")
    p.add_argument("--burstiness", type=float, help="gamma shape of inter-arrival gaps (1 = Poisson, <1 burstier)")
    p.add_argument("--num-requests", type=int, help="most requests sent")
    p.add_argument("--duration", type=float, help="seconds after which no request is sent")
    p.add_argument("--drain", type=float, help="seconds in-flight requests get after --duration, then cancelled")
    p.add_argument("--timeout", type=float, help="per-request timeout in seconds")
    p.add_argument("--input-len", type=int, help="prompt length in words (WikiText-2 excerpt)")
    p.add_argument("--output-len", type=int, help="max_new_tokens / max_tokens per request")
    p.add_argument("--disconnect-fraction", type=float, help="share of requests cut after a random number of tokens")
    p.add_argument("--disconnect-within", type=int, help="cut within this many tokens (default: --output-len)")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--ignore-eos", action="store_true", help="openai: send vLLM's ignore_eos (if the server has it)")
    p.add_argument("--model", help="openai model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("GAM_API_KEY"), help="bearer token (env GAM_API_KEY)")
    p.add_argument("--seed", type=int, help="prompt / arrival / disconnect seed")
    p.add_argument("--prompts", type=Path, help="prompt corpus (default: load_tests/prompts.txt)")
    p.add_argument(
        "--calibrate-concurrency",
        type=int,
        default=32,
        help="streams of the closed-loop run that measures capacity for a rate of 'Nx'",
    )
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    p.add_argument("--out", type=Path, help="result path without suffix (.json and .png are written)")
    p.add_argument("--no-requests", action="store_true", help="leave per-request records out of the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-remote", action="store_true", help="allow a target other than loopback")
    p.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for GET /health to answer 200")
    return p


def build_config(args: argparse.Namespace) -> tuple[LoadConfig, str | None]:
    """LoadConfig from the scenario preset plus flags; the second item is a pending 'Nx' rate, if any."""
    preset: dict[str, Any] = dict(SCENARIOS[args.scenario])
    for flag, name in FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            preset[name] = v
    rate = args.rate if args.rate is not None else preset.pop("rate", None)
    preset.pop("rate", None)
    relative = None
    if rate is not None:
        if str(rate).endswith("x"):
            relative = str(rate)
        else:
            preset["rate"] = float(rate)
    cfg = LoadConfig(
        url=args.url,
        api=args.api,
        client=args.client,
        ignore_eos=args.ignore_eos,
        model=args.model,
        api_key=args.api_key,
        **preset,
    )
    if relative is not None:
        cfg.rate = 1.0  # placeholder until calibration; validate() checks the rest
    cfg.validate()
    return cfg, relative


async def calibrate(cfg: LoadConfig, concurrency: int, progress: bool) -> float:
    """Capacity in requests/s: a short closed loop at `concurrency` streams with the run's lengths."""
    cal = dataclasses.replace(
        cfg,
        mode="closed",
        concurrency=concurrency,
        num_requests=2 * concurrency,
        duration_s=min(cfg.duration_s, 30.0),
        disconnect_fraction=0.0,
    )
    res = await run_load(cal, progress=progress)
    s = summarize(res.records, res.duration_s)
    if s["completed"] == 0:
        raise RuntimeError(f"calibration failed: no request completed ({s['errors']})")
    return s["request_throughput"]


async def amain(args: argparse.Namespace) -> int:
    cfg, relative = build_config(args)
    check_target(cfg.url, args.allow_remote)
    percentiles = [float(p) for p in args.percentiles.split(",") if p]
    slos = parse_goodput(args.goodput)
    if cfg.api == "openai" and cfg.model is None:
        cfg.model = await resolve_model(cfg.url, cfg.api_key)
    before = await health(cfg.url, cfg.api_key, args.wait_ready)
    if before is None:
        raise ConnectionError(f"cannot reach {cfg.url} (is the server up? --wait-ready S polls /health first)")
    extra: dict[str, Any] = {"scenario": args.scenario, "health_before": before}
    if relative is not None:
        capacity = await calibrate(cfg, args.calibrate_concurrency, not args.no_progress)
        cfg.rate = float(relative[:-1]) * capacity
        extra["calibration"] = {
            "capacity_req_per_s": capacity,
            "concurrency": args.calibrate_concurrency,
            "rate": relative,
        }
        print(f"capacity {capacity:.2f} req/s at {args.calibrate_concurrency} streams -> rate {cfg.rate:.2f} req/s")
    result = await run_load(cfg, progress=not args.no_progress)
    extra["health_after"] = await health(cfg.url, cfg.api_key)  # still up after the load (burst, soak)?
    doc = document(result, percentiles, slos, extra, with_requests=not args.no_requests)
    out = args.out or Path("load_results") / f"{args.scenario}-{cfg.api}-{time.strftime('%Y%m%dT%H%M%S')}"
    js, png = write(result, doc, out)
    print(table(doc["summary"]))
    print(f"/health: {before} before the run, {extra['health_after']} after")
    print(f"wrote {js} and {png}")
    return 0 if doc["summary"]["completed"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(amain(args))
    except (RemoteTargetError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
