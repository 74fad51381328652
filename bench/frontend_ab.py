"""A/B of the HTTP frontend's CPU per streamed token: gam-serve from two (or more) checkouts, same model (the micro
model, or the paper config with --config paper), runs alternated round by round, medians.

    .venv/bin/python bench/frontend_ab.py base=/path/to/old/checkout new=. [new8=.:stream-interval=8]
        [--reps 3] [--seconds 8] [--streams 256] [--tokens 128] [--config micro|paper]

Each SPEC is LABEL=CHECKOUT[:flag=value,...]: a `gam-serve` started from that checkout (PYTHONPATH=CHECKOUT, this
venv) with the extra flags. Model: bench/host.py's micro model (random weights, the bundled tokenizer), the step
cheap enough for the host path to show, or (--config paper) its paper-config model. Load: the raw client, OpenAI
streaming, N closed-loop streams, greedy with eos biased out so every request runs its full length. Per run: frontend CPU (every process of the server but the
engine core, from /proc) and engine-core CPU per streamed token, and tokens/s. Ratios between the labels of one
invocation are what to read; a shared machine moves the absolute figures. Compare two commits with a worktree:
`git worktree add /tmp/base <commit>` then `bench/frontend_ab.py base=/tmp/base new=.`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ServerProcess, bundled_model_dir, process_tree_cpu, random_paper_checkpoint
from bench.host import ENGINE_CORE, MAX_BATCH, MICRO, PAPER_SERVED
from load_tests.runner import LoadConfig, RunResult, resolve_model, run, run_load


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """LABEL=CHECKOUT[:flag=value,...] -> (label, checkout, {flag: value}) (this file's and frontend_capacity.py's)."""
    label, _, rest = spec.partition("=")
    checkout, _, flags = rest.partition(":")
    return label, Path(checkout), dict(flag.split("=", 1) for flag in filter(None, flags.split(",")))


def server(spec: str, model_dir: Path) -> ServerProcess:
    """LABEL=CHECKOUT[:flag=value,...] -> a gam-serve of that checkout (not started)."""
    _, checkout, extra = parse_spec(spec)
    return ServerProcess(model_dir, threads=2, checkout=checkout, max_batch_size=MAX_BATCH, max_queue=1024,
                         request_timeout=3600, **{k.replace("-", "_"): v for k, v in extra.items()})  # fmt: skip


async def stream_load(
    url: str, streams: int, tokens: int, seconds: float, extra_body: dict[str, Any] | None = None
) -> RunResult:
    """The A/B benches' load: `streams` closed-loop OpenAI streams of `tokens` tokens for `seconds` (the raw client)."""
    cfg = LoadConfig(url=url, api="openai", concurrency=streams, duration_s=seconds, drain_s=600,
                     output_tokens=tokens, num_requests=10**7, client="raw", model=await resolve_model(url),
                     extra_body=extra_body or {})  # fmt: skip
    return await run_load(cfg, progress=False)


async def load(url: str, args: argparse.Namespace, seconds: float) -> RunResult:
    """Eos biased out: with the model's own sampling, every request runs its full length."""
    return await stream_load(url, args.streams, args.tokens, seconds, {"logit_bias": {str(args.eos): -100}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", help="LABEL=CHECKOUT[:flag=value,...]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--config", choices=("micro", "paper"), default="micro", help="the model: bench/host.py's micro "
                    "model (a step cheap enough for the host path to show) or the paper config")  # fmt: skip
    args = ap.parse_args(argv)
    bundled = bundled_model_dir()
    if bundled is None:
        raise SystemExit("needs the bundled model's tokenizer (weights/*/tokenizer.json)")
    labels = [parse_spec(spec)[0] for spec in args.specs]
    rows: dict[str, list[tuple[float, float, float]]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        config = MICRO if args.config == "micro" else PAPER_SERVED
        model_dir = random_paper_checkpoint(Path(tmp) / args.config, bundled, **config)
        args.eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
        servers = [stack.enter_context(server(spec, model_dir)) for spec in args.specs]
        for srv in servers:
            run(load(srv.url, args, 2.0))  # warm
        for rep in range(args.reps):
            for label, srv in zip(labels, servers, strict=True):
                assert srv.proc is not None
                before, t0 = process_tree_cpu(srv.proc.pid), time.monotonic()
                res = run(load(srv.url, args, args.seconds))
                after, wall = process_tree_cpu(srv.proc.pid), time.monotonic() - t0
                tokens = sum(len(r.token_times) for r in res.records)
                used = {pid: s - before.get(pid, (name, 0.0))[1] for pid, (name, s) in after.items()}
                core = sum(u for pid, u in used.items() if after[pid][0] == ENGINE_CORE)
                rows[label].append(((sum(used.values()) - core) / tokens * 1e6, core / tokens * 1e6, tokens / wall))
                front, core_us, tok_s = rows[label][-1]
                print(f"{label:>12} rep {rep}: frontend {front:6.1f} us/token, engine core {core_us:6.1f} us/token, "
                      f"{tok_s:8.0f} tokens/s", flush=True)  # fmt: skip
    first = statistics.median(r[0] for r in rows[labels[0]])
    print(f"\nmedians of {args.reps}, {args.streams} streams x {args.tokens} tokens:")
    for label, runs in rows.items():
        front = statistics.median(r[0] for r in runs)
        print(f"{label:>12}: frontend {front:6.1f} us/token ({front / first:.2f}x {labels[0]}), engine core "
              f"{statistics.median(r[1] for r in runs):6.1f} us/token, {statistics.median(r[2] for r in runs):8.0f} tokens/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
