"""Deterministic mode served: per-request latency and tokens/s of `gam-serve --deterministic` over the default's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/deterministic_serving.py [--streams 16 64] [--baseline DIR]

Two gam-serve processes on 127.0.0.1 (the default mode and --deterministic; with --baseline, a third: deterministic
mode served from that checkout, e.g. `git archive <commit> | tar -x -C DIR`), the bundled model in fp32, a pool of
--pool slots, --threads torch threads each. For each number of streams: closed loops of that many greedy TGI
streams of --output-len tokens (load_tests, raw client), --rounds requests per stream, the servers taking turns
(order reversed every repeat); medians of --repeats. Reports end-to-end latency, time per output token, TTFT,
output tokens/s and server CPU time per output token (gam-serve and its engine core: the steadiest figure on a shared
machine) of each deterministic server over the default's, and the CPU seconds the load generator used. Writes bench/results/deterministic_serving.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ServerProcess, machine, served_model
from load_tests.metrics import summarize
from load_tests.runner import LoadConfig, run, run_load

KEYS = ("e2el_ms", "tpot_ms", "ttft_ms", "tok_s", "server_cpu_ms_per_token", "server_cpu_s", "client_cpu_s")


async def one_run(srv: ServerProcess, streams: int, args: argparse.Namespace, seed: int) -> dict:
    """One closed-loop run against srv: the load generator's medians and the CPU both sides used."""
    cfg = LoadConfig(url=srv.url, api="tgi", mode="closed", concurrency=streams, num_requests=args.rounds * streams,
                     input_words=args.input_len, output_tokens=args.output_len, duration_s=1800, timeout_s=1800,
                     seed=seed, client="raw")  # fmt: skip
    server0, client0 = srv.cpu_seconds(), time.process_time()
    res = await run_load(cfg, progress=False)
    server_cpu, client_cpu = srv.cpu_seconds() - server0, time.process_time() - client0
    s = summarize(res.records, res.duration_s)
    return dict(e2el_ms=s["e2el"]["median_ms"], tpot_ms=s["tpot"]["median_ms"], ttft_ms=s["ttft"]["median_ms"],
                tok_s=s["output_throughput"], server_cpu_ms_per_token=1e3 * server_cpu / s["total_output_tokens"],
                server_cpu_s=server_cpu, client_cpu_s=client_cpu, errors=s["errors"])  # fmt: skip


async def bench(args: argparse.Namespace, model_dir: Path) -> dict:
    common = dict(max_batch_size=args.pool, max_queue=4096, max_new_tokens=args.output_len, dtype="float32",
                  request_timeout=1800)  # fmt: skip
    servers = {"default": dict(deterministic=False), "deterministic": dict(deterministic=True)}
    if args.baseline:
        servers["deterministic (baseline)"] = dict(deterministic=True, checkout=args.baseline)
    out: dict = {}
    with ExitStack() as stack:
        srvs = {n: stack.enter_context(ServerProcess(model_dir, threads=args.threads, **common, **kw))
                for n, kw in servers.items()}  # fmt: skip
        for streams in args.streams:
            for srv in srvs.values():  # warm-up
                await one_run(srv, min(streams, 8), args, seed=99)
            runs: dict[str, list[dict]] = {n: [] for n in srvs}
            for rep in range(args.repeats):
                for name in list(srvs)[:: 1 if rep % 2 == 0 else -1]:
                    r = await one_run(srvs[name], streams, args, seed=rep)
                    runs[name].append(r)
                    print(f"{streams} streams, repeat {rep}, {name}: " + ", ".join(f"{k} {r[k]:.1f}" for k in KEYS)
                          + f", errors {r['errors']}", flush=True)  # fmt: skip
            med = {n: {k: statistics.median(r[k] for r in rs) for k in KEYS} for n, rs in runs.items()}
            ratios = {n: {k: med[n][k] / med["default"][k] for k in KEYS[:5]} for n in srvs if n != "default"}
            for n, r in ratios.items():
                print(
                    f"{streams} streams, {n} / default: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True
                )
            out[str(streams)] = {"runs": runs, "median": med, "over_default": ratios}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the bundled model)")
    p.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    p.add_argument("--pool", type=int, default=64, help="--max-batch-size of every server")
    p.add_argument("--rounds", type=int, default=2, help="requests per stream in a run")
    p.add_argument("--input-len", type=int, default=48, help="prompt words")
    p.add_argument("--output-len", type=int, default=96, help="max new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--baseline", type=Path, help="a checkout to serve deterministic mode from as well")
    p.add_argument("--out", type=Path, default=RESULTS / "deterministic_serving.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, source = served_model(args.model, Path(tmp))
        result = run(bench(args, model_dir.resolve()))
    doc = {"command": "python bench/deterministic_serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "model": {"dir": str(model_dir), "source": source},
           "settings": vars(args) | {"model": str(args.model), "baseline": str(args.baseline), "out": str(args.out)},
           "results": result}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
