"""Host-path benchmark (issue #13): served tokens/s against the bare decode step, and host CPU per token.

    OMP_NUM_THREADS=2 .venv/bin/python bench/host.py [--quick] [--only bare,served,micro,mock] [--streams 1 64 256]
        [--tokens 128] [--reps 3] [--threads 2] [--dtype auto|bfloat16|float32] [--device cpu]

1. Paper config (width 512, 6 layers, 512 slots, k 3, block 4096) with random weights and the bundled model's
   tokenizer (its 8192-token byte-level BPE), written as a checkpoint into a temp dir:
   - bare: `Decoder.step` in a loop at batch N for each N of --streams, and step + `gam_model.sampling.sample` with
     the served requests' sampling parameters; the two alternate call by call, medians of --reps;
   - served: gam-serve (--max-batch-size 256) in a subprocess driven by the load generator (load_tests): OpenAI
     streaming /v1/completions, N concurrent streams in a closed loop, --tokens per request. A request cannot end
     early: greedy, no stop strings, eos biased out with OpenAI `logit_bias` -100 (gam-serve has no ignore_eos),
     and every request's usage.completion_tokens is checked. Tokens/s, ITL p50, served/bare, and beside each figure
     the load generator's own CPU (this process; its raw client unless --client httpx) per token and in % of one
     core. At >= 64 streams a second server with --stream-interval (default 8) runs alternated with the first.
2. Micro model (width 40, 2 layers, 0.53 M parameters; the same tokenizer) at 256 streams, a step cheap enough
   for the host path to show, as a GPU-sized step would:
   - engine-core host µs per generated token, forward and sampling excluded: gam_engine_busy_seconds_total
     {part="host"} from /metrics over the measured window / generated tokens (n/a when the server has no counter);
   - frontend CPU µs per streamed token: CPU time of every process in the gam-serve tree but gam-engine-core; of
     it, the kernel's part (system CPU); and the frontend CPU per request of 1-token requests (the per-request part
     of the per-token figure is that / --tokens);
   - frontend tokens/s with --api-server-count 1 and 2 (skipped when gam-serve has no such flag);
   - the same with --stream-interval; and a lower bound: kernel CPU per send() of one event to a loopback socket
     whose reader is busy (a send that must wake a sleeping reader costs more).
   On these 2 cores the micro model's forward shares the CPU with the frontend, and the core is slower than the
   frontend, so every stream's write carries one token: the frontend's figures here are not its own cost alone.
3. Mock model: the frontend alone (bench/frontend_capacity.py in a subprocess): a stand-in engine core with no model
   gives each of 256 streams a token every millisecond, as a GPU step that outruns the host would, so the frontend
   is saturated; frontend CPU µs per streamed token (the goal), its kernel part, tokens/s with 1 and 2 HTTP worker
   processes, the stand-in's and the load generator's CPU. Its figures are medians of --reps alternated runs.

dtype auto = bfloat16 where bf16 is native (CUDA, or a CPU with avx512_bf16 / amx_bf16), else float32: without it
bf16 GEMMs take a slow path and a step that slow would hide the host path this measures.
It imports nothing from server/: gam-serve runs as a subprocess, its processes and /metrics are read from outside, so
it measures whatever server this checkout has (part 3's stand-in core speaks server/protocol.py, in its own
process). Prints everything side by side and writes bench/results/host.json.
Not a test: a missed goal is reported, not raised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    ServerProcess,
    bundled_model_dir,
    machine,
    process_tree_cpu,
    random_paper_checkpoint,
    serve_help,
)
from bench.decode import Bench, sync
from gam_model.checkpoint import load_checkpoint
from gam_model.decode import Decoder
from gam_model.model import GAM
from gam_model.sampling import SamplingParams, SequenceSampler, sample
from load_tests.metrics import summarize
from load_tests.prompts import PromptSampler
from load_tests.runner import CLIENTS, LoadConfig, resolve_model, run, run_load

PAPER_SERVED = dict(block_size=4096)  # over GAMConfig's defaults, which are the paper's (512 wide, 6 layers, ...)
MICRO = dict(n_embd=40, n_layer=2, n_slots=64, block_size=4096)
MAX_BATCH = 256  # --max-batch-size of every server here
MICRO_STREAMS = 256
INPUT_WORDS = 64  # prompt length in words, served and bare alike (the load generator's default)
ENGINE_CORE = "gam-engine-core"  # psutil Process.name() of the engine-core process, where the server has one
BUSY = "gam_engine_busy_seconds_total"  # wall seconds of the engine core's busy iterations, by part
GENERATED = "gam_generated_tokens_total"
ITL_GOAL, SERVED_GOAL, HOST_GOAL_US, FRONTEND_GOAL_US = 1.15, 0.8, 5.0, 15.0


# -- pure helpers (tests/bench/test_host.py) ----------------------------------------------------------------------
def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` whose labels include `labels` in a Prometheus text; None when there is none."""
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return math.fsum(values) if values else None


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds used)} between two `process_tree_cpu` snapshots. A process that started in between
    counts from zero (so does a reused pid under another name); one that ended in between is not seen."""
    return {
        pid: (name, seconds - before[pid][1] if pid in before and before[pid][0] == name else seconds)
        for pid, (name, seconds) in after.items()
    }


def cpu_split(used: dict[int, tuple[str, float]]) -> tuple[float | None, float]:
    """(CPU seconds of the engine core, None if there is no such process; of every other process) from `cpu_used`."""
    core = [seconds for name, seconds in used.values() if name == ENGINE_CORE]
    return (math.fsum(core) if core else None), math.fsum(s for name, s in used.values() if name != ENGINE_CORE)


def counter_delta(before: str, after: str, name: str, **labels: str) -> float | None:
    """How much a counter grew between two /metrics texts; None when the later one has no such counter."""
    end = metric_sum(after, name, **labels)
    return None if end is None else end - (metric_sum(before, name, **labels) or 0.0)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero."""
    return None if a is None or not b else a / b


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per numeric field of the runs, the median over the runs that have it (None where none has)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) or v is None]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r[k], (int, float))]
        out[k] = statistics.median(vals) if vals else None
    return out


# -- processes and metrics of a running server ----------------------------------------------------------------
async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(url + "/metrics")
        r.raise_for_status()
        return r.text


# -- bare step loop ----------------------------------------------------------------------------------------
def request_params(eos_id: int | None) -> SamplingParams:
    """What every served request here asks for (OpenAI temperature 0, logit_bias {eos: -100})."""
    return SamplingParams(temperature=0.0, logit_bias=None if eos_id is None else {eos_id: -100.0})


def prompts_of(tokenizer: Any, batch: int, seed: int) -> list[list[int]]:
    """`batch` prompts of INPUT_WORDS words from the load generator's corpus, as token ids."""
    sampler = PromptSampler(seed=seed)
    return [tokenizer.encode(sampler.sample(INPUT_WORDS)) for _ in range(batch)]


class BareLoop:
    """Decoder.step in a loop at batch len(prompts), alone and followed by sample() with the served requests'
    parameters. Each measure() times one call of each (alternated, so a noisy machine slows both alike); a call is
    about target_s of steps, sized once so that `calls` measures stay in the cached regime (before block_size)."""

    def __init__(self, model: GAM, prompts: list[list[int]], eos_id: int | None, calls: int, max_steps: int,
                 target_s: float, device: torch.device) -> None:  # fmt: skip
        self.batch, self.device, cfg = len(prompts), device, model.config
        self.dec = Decoder(model, num_slots=self.batch)
        self.slots = [self.dec.allocate() for _ in range(self.batch)]
        self.dec.prefill(self.slots, prompts)
        self.rows = [SequenceSampler(request_params(eos_id), p, cfg.vocab_size, device) for p in prompts]
        self.zeros = torch.zeros(self.batch, dtype=torch.long, device=device)  # (B,)
        self.wall: dict[str, list[float]] = {"step": [], "sample": []}
        self.cpu: dict[str, list[float]] = {"step": [], "sample": []}
        self.n = 2
        per_step = self._timed("step")[0] / self.n
        room = (cfg.block_size - max(map(len, prompts)) - self.n) // (2 * (calls + 1))
        self.n = max(1, min(max_steps, room, round(target_s / per_step)))
        self._timed("step"), self._timed("sample")  # warm-up at the final call length
        self.block_size = cfg.block_size

    def _run(self, kind: str) -> None:
        tok = self.zeros
        for _ in range(self.n):
            logits = self.dec.step(self.slots, tok)  # (B, V)
            if kind == "sample":
                tok = sample(logits, self.rows).tokens  # (B,)

    def _timed(self, kind: str) -> tuple[float, float]:
        """Wall and CPU seconds (this process) of one call."""
        sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        self._run(kind)
        sync(self.device)
        return time.perf_counter() - w, time.process_time() - c

    def measure(self) -> None:
        for kind in ("step", "sample"):
            w, c = self._timed(kind)
            self.wall[kind].append(w)
            self.cpu[kind].append(c)
        assert max(self.dec.length(s) for s in self.slots) <= self.block_size, "the bare loop left the cached regime"

    def result(self) -> dict[str, float]:
        """Medians over the measured calls: ms per step, tokens/s and tokens per CPU-second, alone and sampled."""
        out: dict[str, float] = {"batch": self.batch, "steps_per_call": self.n, "calls": len(self.wall["step"])}
        tokens = self.batch * self.n
        for kind in ("step", "sample"):
            w, c = statistics.median(self.wall[kind]), statistics.median(self.cpu[kind])
            out |= {f"{kind}_ms": 1e3 * w / self.n, f"{kind}_tok_s": tokens / w, f"{kind}_tok_per_cpu_s": tokens / c}
        return out


# -- served ------------------------------------------------------------------------------------------------
async def served(srv: ServerProcess, model_id: str | None, eos_id: int | None, streams: int, requests: int,
                 tokens: int, seed: int, client: str) -> dict[str, Any]:  # fmt: skip
    """One closed-loop run of `requests` OpenAI streaming completions at `streams` concurrent streams, with the CPU
    the server's processes and this process (the load generator) used over it, and the engine's /metrics counters."""
    assert srv.proc is not None
    bias = {} if eos_id is None else {"logit_bias": {str(eos_id): -100}}  # no request can end early
    cfg = LoadConfig(url=srv.url, api="openai", mode="closed", concurrency=streams, num_requests=requests,
                     duration_s=3600, drain_s=600, timeout_s=3600, input_words=INPUT_WORDS, output_tokens=tokens,
                     model=model_id, seed=seed, client=client, extra_body=bias)  # fmt: skip
    m0 = await scrape(srv.url)
    cpu0, sys0, client0 = process_tree_cpu(srv.proc.pid), process_tree_cpu(srv.proc.pid, True), time.process_time()
    res = await run_load(cfg, progress=False)
    client, cpu1 = time.process_time() - client0, process_tree_cpu(srv.proc.pid)
    sys1 = process_tree_cpu(srv.proc.pid, True)
    m1 = await scrape(srv.url)
    s = summarize(res.records, res.duration_s)
    n = s["total_output_tokens"]  # streamed to the client, by the server's usage counts
    used = cpu_used(cpu0, cpu1)
    core_s, frontend_s = cpu_split(used)
    frontend_sys_s = cpu_split(cpu_used(sys0, sys1))[1]
    generated = counter_delta(m0, m1, GENERATED) or n
    busy = {part: counter_delta(m0, m1, BUSY, part=part) for part in ("forward", "sample", "host")}
    host_s = busy["host"]
    return {
        "streams": streams,
        "requests": requests,
        "completed": s["completed"],
        "errors": s["errors"],
        "short": sum(r.success and r.n_output < tokens for r in res.records),  # ended before max_tokens
        "tokens": n,
        "generated": generated,
        "duration_s": res.duration_s,
        "tok_s": s["output_throughput"],
        "itl_p50_ms": s["itl"]["median_ms"],
        "ttft_p50_ms": s["ttft"]["median_ms"],
        "client_cpu_s": client,
        "client_us_per_token": ratio(1e6 * client, n),
        "client_core_pct": 100 * client / res.duration_s,
        "engine_core_cpu_s": core_s,
        "engine_core_us_per_token": None if core_s is None else ratio(1e6 * core_s, generated),
        "frontend_cpu_s": frontend_s,
        "frontend_us_per_token": ratio(1e6 * frontend_s, n),
        "frontend_system_us_per_token": ratio(1e6 * frontend_sys_s, n),  # of which in the kernel
        "frontend_us_per_request": ratio(1e6 * frontend_s, s["completed"]),
        "server_tok_per_cpu_s": ratio(n, frontend_s + (core_s or 0.0)),  # every process of the server together
        "server_processes": {f"{name} {pid}": seconds for pid, (name, seconds) in used.items()},  # CPU s used
        "busy_s": busy,
        "host_us_per_token": None if host_s is None else ratio(1e6 * host_s, generated),
    }


async def alternated(loop: BareLoop | None, servers: list[tuple[ServerProcess, str | None]], eos_id: int | None,
                     streams: int, args: argparse.Namespace, label: str) -> dict[str, Any]:  # fmt: skip
    """args.reps rounds of: two bare calls of each kind, then one served closed-loop run at `streams` streams (one
    round of requests, at least args.min_requests) on each (server, model id), so every side meets the same machine.
    {"bare": medians, "served": [{"runs", "served": medians} per server]}; failed requests or ones that ended early
    are reported (their tokens still count)."""
    runs: list[list[dict[str, Any]]] = [[] for _ in servers]
    for seed in range(args.reps):
        if loop is not None:
            loop.measure()
            loop.measure()
        for i, (srv, model_id) in enumerate(servers):
            requests = max(streams, args.min_requests)
            runs[i].append(await served(srv, model_id, eos_id, streams, requests, args.tokens, seed, args.client))
    for i, rs in enumerate(runs):
        failed, short = sum(r["requests"] - r["completed"] for r in rs), sum(r["short"] for r in rs)
        if failed or short:
            print(f"  WARNING {label} (server {i}): {failed} failed {[r['errors'] for r in rs]}, {short} ended "
                  f"before {args.tokens} tokens", flush=True)  # fmt: skip
    bare = None if loop is None else loop.result()
    return {"bare": bare, "served": [{"runs": rs, "served": medians(rs)} for rs in runs]}


async def started(stack: contextlib.ExitStack, model_dir: Path, args: argparse.Namespace, eos_id: int | None,
                  streams: int, **extra: object) -> tuple[ServerProcess, str | None]:  # fmt: skip
    """A gam-serve up (closed with the stack), its model id, warmed by one round at `streams` streams."""
    srv = stack.enter_context(server_for(model_dir, args, **extra))
    model_id = await resolve_model(srv.url)
    await served(srv, model_id, eos_id, streams, streams, 8, 10_000, args.client)  # warm: first batches, allocations
    return srv, model_id


def server_for(model_dir: Path, args: argparse.Namespace, **extra: object) -> ServerProcess:
    return ServerProcess(model_dir, threads=args.threads, device=args.device, dtype=args.dtype_resolved,
                         max_batch_size=MAX_BATCH, max_queue=max(MAX_BATCH, *args.streams),
                         request_timeout=3600, **extra)  # fmt: skip


def na(b: Bench, name: str, why: str) -> None:
    """A row that has no figure, with the reason (never an invented value)."""
    b.results.append(dict(name=name, value=None, note=why))
    print(f"{name:<66}        n/a ({why})", flush=True)


def put(
    b: Bench, name: str, value: float | None, target: float | None = None, higher: bool = True, **extra: Any
) -> None:
    """b.add, or an n/a row when the value is missing (no requests completed, no figure from the server)."""
    if value is None:
        na(b, name, "no value")
    else:
        b.add(name, value, target, higher, **extra)


def add_client(b: Bench, m: dict[str, float | None], indent: str = "  ") -> None:
    """The load generator's own CPU beside a served figure."""
    put(b, f"{indent}load generator CPU us per token", m["client_us_per_token"])
    put(b, f"{indent}load generator CPU, % of one core", m["client_core_pct"])


def model_info(model_dir: Path, model: GAM, tokenizer_source: str) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    keys = ("vocab_size", "block_size", "n_embd", "n_layer", "n_slots", "conv_kernel")
    return {"params": sum(p.numel() for p in model.parameters()), "weights": "random (seed 0)",
            "tokenizer": tokenizer_source, "eos_token_id": cfg["eos_token_id"], **{k: cfg[k] for k in keys}}  # fmt: skip


def checkpoint(tmp: Path, name: str, args: argparse.Namespace, **config: int) -> tuple[Path, GAM, Any, dict]:
    """A random-weight checkpoint with the bundled model's tokenizer, loaded here too (same weights, same dtype)."""
    bundled = bundled_model_dir()
    if bundled is None:
        raise SystemExit("bench/host.py needs the bundled model's tokenizer (weights/*/tokenizer.json)")
    model_dir = random_paper_checkpoint(tmp / name, bundled, **config)
    model, tok, _ = load_checkpoint(model_dir, args.device, getattr(torch, args.dtype_resolved))
    source = f"{bundled.name}'s byte-level BPE ({tok.vocab_size} tokens)"
    return model_dir, model, tok, model_info(model_dir, model, source)


def add_bare(b: Bench, bare: dict[str, float], prefix: str = "") -> None:
    n = bare["batch"]
    b.add(f"{prefix}bare Decoder.step, batch {n}: tokens/s", bare["step_tok_s"], step_ms=bare["step_ms"])
    b.add(f"  {prefix}bare step ms (per stream: ms/token), batch {n}", bare["step_ms"])
    b.add(f"  {prefix}bare step + sample, batch {n}: tokens/s", bare["sample_tok_s"], sample_ms=bare["sample_ms"])


def add_ratios(b: Bench, n: int, bare: dict[str, float], m: dict[str, float | None], prefix: str = "") -> dict:
    """served / bare at n streams: tokens/s (goal at >= 64 streams), ITL at 1 stream (goal), per CPU-second."""
    out = {"served_over_bare": ratio(m["tok_s"], bare["step_tok_s"]),
           "served_over_bare_sample": ratio(m["tok_s"], bare["sample_tok_s"]),
           "cpu_s_ratio": ratio(m["server_tok_per_cpu_s"], bare["sample_tok_per_cpu_s"])}  # fmt: skip
    if n == 1:
        out["itl_over_bare_step"] = ratio(m["itl_p50_ms"], bare["step_ms"])
        put(b, f"  goal: {prefix}1 stream ITL p50 / bare step ms", out["itl_over_bare_step"], ITL_GOAL, False)
    goal = n >= 64 and not prefix
    name = f"  {'goal: ' if goal else ''}{prefix}served / bare step tokens/s, {n} stream(s)"
    put(b, name, out["served_over_bare"], SERVED_GOAL if goal else None)
    put(b, f"  {prefix}served / bare step+sample tokens/s, {n} stream(s)", out["served_over_bare_sample"])
    put(b, f"  {prefix}served / bare step+sample, tokens per CPU-second (server vs bare process)",
        out["cpu_s_ratio"])  # fmt: skip
    return out


async def paper(b: Bench, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part 1: bare step loop and served at each --streams, paper config."""
    model_dir, model, tok, info = checkpoint(tmp, "paper", args, **PAPER_SERVED)
    eos = info["eos_token_id"]
    print(f"\n== paper config, {args.dtype_resolved}, {info['params'] / 1e6:.1f} M params, {info['tokenizer']}; "
          f"{args.threads} torch threads; {args.tokens} tokens per request", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = [await started(stack, model_dir, args, eos, max(args.streams))] if "served" in args.only else []
        # beside it, at >= 64 streams: a server with --stream-interval (how much of the gap is per-token host work)
        interval = args.stream_interval if args.stream_interval > 1 and "--stream-interval" in serve_help() else None
        if servers and interval and max(args.streams) >= 64:
            servers.append(await started(stack, model_dir, args, eos, max(args.streams), stream_interval=interval))
        # and one with the overlap scheduler flipped from its default (on for cuda, off on cpu): what it buys
        flip = None
        if servers and args.overlap_ab and "--overlap" in serve_help() and max(args.streams) >= 64:
            flip = "off" if torch.device(args.device).type == "cuda" else "on"
            servers.append(await started(stack, model_dir, args, eos, max(args.streams), overlap=flip))
        for n in args.streams:
            loop = BareLoop(model, prompts_of(tok, n, n), eos, 2 * args.reps, args.tokens, args.call_s,
                            torch.device(args.device)) if "bare" in args.only else None  # fmt: skip
            res = await alternated(loop, servers if n >= 64 else servers[:1], eos, n, args, f"{n} stream(s)")
            row = {"streams": n, "bare": res["bare"], **(res["served"][0] if servers else {"served": None})}
            if len(res["served"]) > 1 and interval:
                row[f"stream_interval_{interval}"] = res["served"][1]
            if len(res["served"]) > 1 and flip:
                row[f"overlap_{flip}"] = res["served"][-1]
            if row["bare"] is not None:
                add_bare(b, row["bare"])
            if (m := row["served"]) is not None:
                put(b, f"served, {n} stream(s): tokens/s", m["tok_s"], runs=len(row["runs"]))
                put(b, f"  ITL p50 ms, {n} stream(s)", m["itl_p50_ms"])
                add_client(b, m)
            if row["bare"] is not None and m is not None:
                row |= add_ratios(b, n, row["bare"], m)
            if (si := row.get(f"stream_interval_{interval}")) is not None:
                ms = si["served"]
                put(b, f"  served, {n} streams, --stream-interval {interval}: tokens/s", ms["tok_s"])
                add_client(b, ms, "    ")
                if row["bare"] is not None:
                    put(b, f"    served / bare step tokens/s, --stream-interval {interval}",
                        ratio(ms["tok_s"], row["bare"]["step_tok_s"]))  # fmt: skip
                    put(b, f"    served / bare step+sample tokens/s, --stream-interval {interval}",
                        ratio(ms["tok_s"], row["bare"]["sample_tok_s"]))  # fmt: skip
            if (ov := row.get(f"overlap_{flip}")) is not None and m is not None:
                mo = ov["served"]
                put(b, f"  served, {n} streams, --overlap {flip}: tokens/s", mo["tok_s"])
                put(b, f"    --overlap {flip} / default: tokens/s", ratio(mo["tok_s"], m["tok_s"]))
                put(b, f"    --overlap {flip} / default: ITL p50", ratio(mo["itl_p50_ms"], m["itl_p50_ms"]))
                add_client(b, mo, "    ")
            rows.append(row)
    return {"model": info, "rows": rows}


async def micro(b: Bench, args: argparse.Namespace, tmp: Path, help_text: str) -> dict[str, Any]:
    """Part 2: host CPU per token in the engine core and the frontend at 256 streams; frontend scaling."""
    model_dir, model, tok, info = checkpoint(tmp, "micro", args, **MICRO)
    eos, n = info["eos_token_id"], MICRO_STREAMS
    print(f"\n== micro model, {args.dtype_resolved}, {info['params'] / 1e6:.2f} M params, {n} stream(s)", flush=True)
    loop = BareLoop(
        model, prompts_of(tok, n, n), eos, 2 * args.reps, args.tokens, args.call_s, torch.device(args.device)
    )
    frontends = "--api-server-count" in help_text  # then the same runs also measure 1 vs 2 HTTP processes
    with contextlib.ExitStack() as stack:
        servers = [await started(stack, model_dir, args, eos, n, **({"api_server_count": 1} if frontends else {}))]
        if frontends:
            servers.append(await started(stack, model_dir, args, eos, n, api_server_count=2))
        interval = args.stream_interval if args.stream_interval > 1 and "--stream-interval" in help_text else None
        if interval:
            servers.append(await started(stack, model_dir, args, eos, n, stream_interval=interval))
        res = await alternated(loop, servers, eos, n, args, f"micro {n} stream(s)")
        # what one request costs the frontend whatever its length (HTTP, validation, tokenization, submit, response
        # start and end): 1-token requests on the first server, args.reps runs
        srv, model_id = servers[0]
        ones = [await served(srv, model_id, eos, n, 4 * n, 1, seed, args.client) for seed in range(args.reps)]
    out = {"model": info, "streams": n, "bare": res["bare"], **res["served"][0]}
    bare, m = out["bare"], out["served"]
    add_bare(b, bare, "micro ")
    put(b, f"micro served, {n} streams: tokens/s", m["tok_s"])
    add_client(b, m)
    out |= add_ratios(b, n, bare, m, "micro ")
    if m["host_us_per_token"] is None:
        na(b, "  goal: engine-core host us per generated token", f"server has no {BUSY}")
    else:
        b.add("  goal: engine-core host us per generated token", m["host_us_per_token"], HOST_GOAL_US, higher=False)
    single = out["single_process"] = m["engine_core_cpu_s"] is None
    if single:
        na(b, "  engine-core process CPU us per generated token", f"no {ENGINE_CORE} process")
    else:
        put(b, "  engine-core process CPU us per generated token", m["engine_core_us_per_token"])
    # the frontend goal is measured alone (part 3, `mock`): here the micro model's forward shares the 2 cores with
    # the frontend, and each stream's write carries one token (the core is slower than the frontend)
    name = "  frontend CPU us per streamed token" + (" (single process: INCLUDES the engine)" if single else "")
    put(b, name, m["frontend_us_per_token"], single_process=single)
    put(b, "    of which in the kernel (system CPU: socket writes, wake-ups)", m["frontend_system_us_per_token"])
    floor = out["send_floor_us"] = send_floor_us(n)
    put(b, "    lower bound: CPU us per send() of one event, loopback TCP, reader busy (no wake-up)", floor)
    per_request = out["frontend_us_per_request"] = medians(ones)["frontend_us_per_request"]
    put(b, "    frontend CPU us per request (1-token requests)", per_request)
    put(b, f"      / {args.tokens} tokens: its share of the per-streamed-token figure",
        None if per_request is None else per_request / args.tokens)  # fmt: skip
    if interval:
        si = out[f"stream_interval_{interval}"] = res["served"][-1]
        put(b, f"  micro served tokens/s, --stream-interval {interval}", si["served"]["tok_s"])
        put(b, f"    frontend CPU us per streamed token, --stream-interval {interval}",
            si["served"]["frontend_us_per_token"])  # fmt: skip
        add_client(b, si["served"], "    ")
    if not frontends:
        na(b, "  frontend tokens/s, 2 vs 1 HTTP worker processes", "gam-serve has no --api-server-count")
        return out
    two = out["api_server_count_2"] = res["served"][1]  # the runs above had --api-server-count 1; alternated
    for count, mc in ((1, m), (2, two["served"])):
        put(b, f"  micro served tokens/s, --api-server-count {count}", mc["tok_s"])
        put(b, f"    frontend CPU us per streamed token, --api-server-count {count}", mc["frontend_us_per_token"])
    put(b, "  frontend tokens/s, 2 / 1 HTTP worker processes (x)", ratio(two["served"]["tok_s"], m["tok_s"]))
    return out


def mock(b: Bench, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part 3: the frontend alone, saturated: bench/frontend_capacity.py (a stand-in engine core with no model gives
    every stream a token each millisecond, as a GPU step that outruns the host would) with 1 and 2 frontends."""
    out = tmp / "frontend_capacity.json"
    seconds = 3.0 if args.quick else 6.0
    print(f"\n== mock model: the frontend alone, {MICRO_STREAMS} streams, stand-in core", flush=True)
    cmd = [sys.executable, str(Path(__file__).with_name("frontend_capacity.py")), "one=.", "two=.:frontends=2",
           "--streams", str(MICRO_STREAMS), "--tokens", str(args.tokens), "--seconds", str(seconds),
           "--reps", str(args.reps), "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    res = json.loads(out.read_text())
    one, two = res["medians"]["one"], res["medians"]["two"]
    put(b, "  goal: frontend CPU us per streamed token (stand-in core)", one["frontend"], FRONTEND_GOAL_US,
        higher=False)  # fmt: skip
    put(b, "    of which in the kernel (system CPU)", one["frontend_kernel"])
    put(b, "    frontend CPU, % of one core", one["front_core_pct"])
    put(b, "    stand-in core CPU us per token", one["core"])
    put(b, "    load generator CPU us per token", one["client"])
    put(b, "  stand-in core, frontend tokens/s, 1 HTTP worker process", one["tok_s"])
    put(b, "  stand-in core, frontend tokens/s, 2 HTTP worker processes", two["tok_s"])
    put(b, "  frontend tokens/s, 2 / 1 HTTP worker processes, stand-in core (x)", ratio(two["tok_s"], one["tok_s"]))
    return dict(res)


def send_floor_us(streams: int, rounds: int = 200, size: int = 330) -> float:
    """CPU microseconds this thread spends per send() of one SSE event (size bytes, an OpenAI chunk) to one of
    `streams` loopback TCP connections, round robin, while a thread drains them: a lower bound of what one HTTP
    write per token per stream costs in the kernel, whatever the server does in Python (the drain thread is mostly
    busy, so few sends wake it; a send that wakes a sleeping reader process costs more)."""
    import selectors
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    senders, receivers = [], []
    for _ in range(streams):
        senders.append(socket.create_connection(listener.getsockname()))
        receivers.append(listener.accept()[0])
    for sock in senders:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn's transports
    stop = threading.Event()

    def drain() -> None:
        sel = selectors.DefaultSelector()
        for r in receivers:
            r.setblocking(False)
            sel.register(r, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                with contextlib.suppress(BlockingIOError):
                    key.fileobj.recv(1 << 16)  # type: ignore[union-attr]

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    data = b"x" * size
    try:
        c0 = time.thread_time()
        for _ in range(rounds):
            for sock in senders:
                sock.send(data)
        cpu = time.thread_time() - c0
    finally:
        stop.set()
        t.join()
        for sock in senders + receivers + [listener]:
            sock.close()
    return 1e6 * cpu / (rounds * streams)


def side_by_side(part: dict[str, Any], dtype: str) -> None:
    """The paper-config figures as one table."""
    print(f"\npaper config {dtype}, side by side (medians):")
    head = ("streams", "bare tok/s", "bare ms/step", "+sample tok/s", "served tok/s", "ITL p50 ms", "served/bare",
            "loadgen us/tok", "loadgen %core")  # fmt: skip
    print("".join(f"{h:>15}" for h in head))
    for row in part["rows"]:
        bare_, m = row.get("bare") or {}, row.get("served") or {}
        cells = (row["streams"], bare_.get("step_tok_s"), bare_.get("step_ms"), bare_.get("sample_tok_s"),
                 m.get("tok_s"), m.get("itl_p50_ms"), row.get("served_over_bare"), m.get("client_us_per_token"),
                 m.get("client_core_pct"))  # fmt: skip
        print("".join(f"{'-' if c is None else f'{c:.3g}' if isinstance(c, float) else c:>15}" for c in cells))


def resolve_dtype(name: str, device: torch.device) -> str:
    """bfloat16 where it is native (CUDA, a CPU with avx512_bf16 or amx_bf16), else float32; or as given."""
    if name != "auto":
        return name
    m = machine()
    return "bfloat16" if device.type == "cuda" or m["avx512_bf16"] or m["amx_bf16"] else "float32"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 32 tokens per request")
    ap.add_argument(
        "--only", default="bare,served,micro,mock", help="comma-separated subset of bare, served, micro, mock"
    )
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256], help="paper config: streams = bare batch")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default 128; --quick 32)")
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="rounds per figure (default 3; --quick 1): 2 bare calls of each kind, 1 served run",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads, bare loop and server alike")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--client", default="raw", choices=CLIENTS, help="the load generator's HTTP client")
    ap.add_argument("--stream-interval", type=int, default=8,
                    help="also a server with this --stream-interval: micro, and paper config at >= 64 streams (1: none)")  # fmt: skip
    ap.add_argument("--no-overlap-ab", dest="overlap_ab", action="store_false",
                    help="skip the paper-config server with --overlap flipped from its default (>= 64 streams)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "host.json")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - {"bare", "served", "micro", "mock"}
    if unknown or max(args.streams) > MAX_BATCH or min(args.streams) < 1:
        ap.error(f"--only takes bare, served, micro, mock (got {sorted(unknown)}); --streams 1..{MAX_BATCH}")
    args.only = set(args.only.split(","))
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.reps = args.reps or (1 if args.quick else 3)
    args.call_s = 0.25 if args.quick else 1.0  # seconds per timed bare call (steps per call sized to it)
    args.min_requests = 2 if args.quick else 4  # a 1-stream run still yields a few hundred ITL gaps
    args.dtype_resolved = resolve_dtype(args.dtype, torch.device(args.device))
    torch.set_num_threads(args.threads)
    info = {**machine(), "device": args.device, "loadavg_start": os.getloadavg()}
    print(f"machine: {info}", flush=True)
    b, t0 = Bench(), time.perf_counter()
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only & {"bare", "served"}:
            doc["paper"] = run(paper(b, args, Path(tmp)))
            write(args, argv, info, b, doc, t0)  # a part's figures are kept even if a later part fails
        if "micro" in args.only:
            doc["micro"] = run(micro(b, args, Path(tmp), serve_help()))
            write(args, argv, info, b, doc, t0)
        if "mock" in args.only:
            doc["mock"] = mock(b, args, Path(tmp))
    if "paper" in doc:
        side_by_side(doc["paper"], args.dtype_resolved)
    print("\ngoals:")
    for g in goals_of(b):
        verdict = "n/a" if g["value"] is None else "met" if g["met"] else "not met"
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(f"  {g['name'].strip()[6:]:<70} {value:>10}  {verdict}")
    write(args, argv, info, b, doc, t0)
    print(f"wrote {args.out} ({info['wall_s']} s)")
    return 0


def goals_of(b: Bench) -> list[dict[str, Any]]:
    return [r for r in b.results if r["name"].strip().startswith("goal:")]


def write(args: argparse.Namespace, argv: list[str] | None, info: dict, b: Bench, doc: dict, t0: float) -> None:
    """bench/results/host.json (or --out): the machine, the command, settings, every figure so far."""
    info |= {"loadavg_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t0, 1),
             "note": "2 cores shared with other engineers' jobs: ratios were measured side by side, in one run"}  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "<default>")
    cmd = f"OMP_NUM_THREADS={threads} python bench/host.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()}  # fmt: skip
    request = {"api": "OpenAI /v1/completions, stream, stream_options.include_usage", "temperature": 0,
               "max_tokens": args.tokens, "stop": None, "logit_bias": "{eos: -100}", "prompt_words": INPUT_WORDS}  # fmt: skip
    out = dict(benchmark="issue #13 host path", command=cmd, machine=info, settings=settings, request=request,
               results=b.results, goals=goals_of(b), **doc)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
