"""HTTP-served output tokens/s at N concurrent streams vs the engine alone (no HTTP) at batch N.

Both sides run the same workload: the same prompts (WikiText-2 excerpt, same seed), greedy decoding, the same
max new tokens, a closed loop of N concurrent requests until --requests are done. The HTTP side is gam-serve in a
subprocess on 127.0.0.1 driven by the load generator (TGI /generate_stream); the engine side is server.engine.Engine
(this process plus its engine core process) with the handlers' event stream consumed directly. Runs alternate (engine, HTTP, engine, ...);
medians of --repeats. Tokens counted are the tokens generated (a sequence may end early at eos on both sides).
Besides wall-clock tokens/s, tokens per CPU-second of the serving processes are compared (engine: this process and
its engine core; HTTP: the gam-serve process and its engine core, read from /proc): on a shared machine that isolates what HTTP costs the server from
scheduler noise and from the load generator's own CPU use.

    .venv/bin/python bench/serving.py                  # bundled model if weights/ has one, else paper config random
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ServerProcess, machine, served_model, tree_cpu_seconds
from gam_model.sampling import SamplingParams
from load_tests.metrics import summarize
from load_tests.prompts import PromptSampler
from load_tests.runner import CLIENTS, LoadConfig, run, run_load
from server.app import start_context
from server.engine import ErrorEvent, GenerationRequest
from server.settings import Settings


async def engine_alone(engine, prompts: list[list[int]], streams: int, max_new: int) -> tuple[float, int, int]:
    """Closed loop of `streams` requests straight into the engine; returns (seconds, tokens generated, errors)."""
    todo = list(prompts)
    tokens = errors = 0

    async def worker() -> None:
        nonlocal tokens, errors
        while todo:
            ids = todo.pop()
            req = GenerationRequest(ids, SamplingParams(temperature=1.0, do_sample=False), max_new)
            (h,) = await engine.submit_all([req])
            async for ev in h.events():
                if isinstance(ev, ErrorEvent):
                    errors += 1
                    break
                tokens += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return time.perf_counter() - t, tokens, errors


async def bench(args: argparse.Namespace, model_dir: Path) -> dict:
    settings = dict(max_batch_size=args.streams, max_queue=args.requests, max_new_tokens=args.output_len,
                    dtype=args.dtype)  # fmt: skip
    ctx = await start_context(
        Settings.model_validate(dict(model=model_dir, device="cpu", request_timeout=600, **settings))
    )
    engine, tok = ctx.engine, ctx.tokenizer
    rows = []
    try:
        with ServerProcess(model_dir, threads=args.threads, **settings) as srv:
            info = srv.info()
            for rep in range(args.repeats):
                sampler = PromptSampler(seed=rep)
                texts = [sampler.sample(args.input_len) for _ in range(args.requests)]
                cpu0 = tree_cpu_seconds(os.getpid())
                dt, n, err = await engine_alone(engine, [tok.encode(t) for t in texts], args.streams, args.output_len)
                engine_cpu = tree_cpu_seconds(os.getpid()) - cpu0
                cfg = LoadConfig(url=srv.url, api="tgi", mode="closed", concurrency=args.streams,
                                 num_requests=args.requests, input_words=args.input_len, output_tokens=args.output_len,
                                 duration_s=600, timeout_s=600, seed=rep, client=args.client)  # fmt: skip
                server_cpu0, client_cpu0 = srv.cpu_seconds(), time.process_time()
                res = await run_load(cfg, progress=False)
                server_cpu, client_cpu = srv.cpu_seconds() - server_cpu0, time.process_time() - client_cpu0
                s = summarize(res.records, res.duration_s)
                row = {"engine_tok_s": n / dt, "engine_tokens": n, "engine_errors": err, "engine_s": dt,
                       "http_tok_s": s["output_throughput"], "http_tokens": s["total_output_tokens"],
                       "http_errors": s["errors"], "http_s": res.duration_s,
                       "http_ttft_median_ms": s["ttft"]["median_ms"], "http_itl_median_ms": s["itl"]["median_ms"]}  # fmt: skip
                row |= {"engine_cpu_s": engine_cpu, "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
                        "engine_tok_per_cpu_s": n / engine_cpu, "http_tok_per_server_cpu_s": row["http_tokens"] / server_cpu}  # fmt: skip
                row["ratio"] = row["http_tok_s"] / row["engine_tok_s"]
                row["cpu_ratio"] = row["http_tok_per_server_cpu_s"] / row["engine_tok_per_cpu_s"]
                rows.append(row)
                print(f"repeat {rep}: engine {row['engine_tok_s']:.0f} tok/s, HTTP {row['http_tok_s']:.0f} tok/s, "
                      f"ratio {row['ratio']:.3f}; per CPU-second: engine {row['engine_tok_per_cpu_s']:.0f}, server "
                      f"{row['http_tok_per_server_cpu_s']:.0f}, ratio {row['cpu_ratio']:.3f}; client used "
                      f"{client_cpu:.1f} CPU-s (errors: engine {err}, http {s['errors']})", flush=True)  # fmt: skip
    finally:
        await engine.shutdown()
    keys = ("engine_tok_s", "http_tok_s", "engine_tok_per_cpu_s", "http_tok_per_server_cpu_s")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    return {
        "server_info": info,
        "repeats": rows,
        "median": med,
        "ratio_of_medians": med["http_tok_s"] / med["engine_tok_s"],
        "cpu_ratio_of_medians": med["http_tok_per_server_cpu_s"] / med["engine_tok_per_cpu_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: bundled weights/*, else random paper config)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests per run (2 rounds of the streams)")
    p.add_argument("--input-len", type=int, default=64, help="prompt words")
    p.add_argument("--output-len", type=int, default=64, help="max new tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--client", default="raw", choices=CLIENTS, help="the load generator's HTTP client")
    p.add_argument("--dtype", default="float32", help="server dtype, both sides (the server's CPU default: float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, source = served_model(args.model, Path(tmp))
        result = run(bench(args, model_dir))
    doc = {"benchmark": f"HTTP-served tokens/s at {args.streams} streams vs the engine alone at batch {args.streams}",
           "command": "python bench/serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "model": {"dir": str(model_dir), "source": source}, "settings": vars(args) | {
               "model": str(args.model), "out": str(args.out)}, "target": 0.85, **result}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"HTTP / engine tokens/s: {doc['ratio_of_medians']:.3f} (target >= 0.85); per CPU-second of the serving "
        f"process: {doc['cpu_ratio_of_medians']:.3f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
