"""Decode benchmark (issue #2): ratios measured side by side in one run, medians of several repeats.

    OMP_NUM_THREADS=2 .venv/bin/python bench/decode.py [--device cpu|cuda] [--compile] [--quick]

Paper config (22.6M parameters, random weights). Each comparison alternates its two sides (A, B, A, B, ...)
so a noisy machine slows both alike; it prints every ratio against its target and writes
bench/results/decode.json with the machine described. Not a test: a missed target is reported, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine
from gam_model.config import GAMConfig
from gam_model.decode import Decoder
from gam_model.kernels import reference
from gam_model.model import GAM
from gam_model.step import step as step_math

PAPER = dict(vocab_size=10000, block_size=256, n_embd=512, n_layer=6, n_slots=512, conv_kernel=3, dropout=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(a: Callable[[], object], b: Callable[[], object], reps: int, device: torch.device,
            warmup: int = 2) -> tuple[float, float]:  # fmt: skip
    """Median seconds per call of a and of b, calls alternated."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((a, ta), (b, tb)):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def model_of(device: torch.device, dtype: torch.dtype, **over) -> GAM:
    torch.manual_seed(0)
    return GAM(GAMConfig(**{**PAPER, **over})).to(device, dtype).eval()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


class Bench:
    """Collects results (name, value, target, direction) and prints them as they come."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def add(self, name: str, value: float, target: float | None = None, higher: bool = True, **extra) -> None:
        ok = None if target is None else (value >= target if higher else value <= target)
        self.results.append(dict(name=name, value=round(value, 4), target=target,
                                 target_is="min" if higher else "max", met=ok, **extra))  # fmt: skip
        mark = "" if ok is None else ("  OK" if ok else "  MISSED")
        tgt = "" if target is None else f"  (target {'>=' if higher else '<='} {target})"
        print(f"{name:<66} {value:10.3f}{tgt}{mark}", flush=True)


def cached_vs_reference_loop(b: Bench, device: torch.device, reps: int) -> None:
    """Decoder.step at a 256-token context vs the reference loop.

    The reference loop is the paper's generation loop: the full forward (logits at every position) over the
    last block_size tokens, keeping the last position's logits.
    """
    model = model_of(device, torch.float32)
    bs = model.config.block_size
    for batch in (1, 32):
        prompts = random_prompts(batch, bs - 1, model.config.vocab_size, seed=batch)
        dec = Decoder(model, num_slots=batch)
        slots = [dec.allocate() for _ in range(batch)]
        ctx = torch.tensor(prompts, device=device)  # (B, 255)
        tok = torch.zeros(batch, dtype=torch.long, device=device)

        def cached(dec=dec, slots=slots, prompts=prompts, tok=tok) -> None:
            dec.prefill(slots, prompts)  # back to 255 tokens (O(R), untimed below), so the step is at 256
            t0 = time.perf_counter()
            dec.step(slots, tok)
            sync(device)
            cached.t.append(time.perf_counter() - t0)

        cached.t = []

        def loop(ctx=ctx, tok=tok) -> None:
            with torch.inference_mode():
                model(torch.cat([ctx, tok.unsqueeze(1)], 1)[:, -bs:])[:, -1].float()  # (B, V)

        heavy = batch > 1  # the reference loop at batch 32 forwards 8192 tokens per call: fewer repeats
        _, t_loop = compare(cached, loop, 3 if heavy else reps, device, warmup=1 if heavy else 2)
        t_cached = statistics.median(cached.t[1 if heavy else 2 :])
        b.add(f"cached step vs reference loop, 256-token context, batch {batch} (x)", t_loop / t_cached, 50,
              cached_s=t_cached, reference_s=t_loop)  # fmt: skip
        if heavy:
            continue
        # The batch-1 step is memory bound: it must read every weight once per token. The time of a bare
        # streaming read of those bytes (a sum over each parameter) bounds the ratio any batch-1 step can reach.
        params = [p for p in model.parameters()]

        def read_weights(params=params) -> None:
            with torch.inference_mode():
                for p in params:
                    p.sum()

        t_read, t_loop3 = compare(read_weights, loop, reps, device)
        mb = sum(p.numel() * p.element_size() for p in params) / 1e6
        b.add(f"  ceiling at batch 1: reference loop / one streaming read of the {mb:.0f} MB of weights (x)",
              t_loop3 / t_read, read_s=t_read, cached_s=t_cached)  # fmt: skip
        # Past block_size the step recomputes the R-token window (DESIGN 1.3): reported, no target.
        long = [[*p, 1, 2] for p in prompts]  # 257 tokens: the sliding-window regime
        dec2 = Decoder(model, num_slots=batch)
        s2 = [dec2.allocate() for _ in range(batch)]
        dec2.prefill(s2, long)
        t_win, t_loop2 = compare(lambda dec2=dec2, s2=s2, tok=tok: dec2.step(s2, tok), loop, reps, device)
        b.add(f"  sliding-window step (past block_size) vs reference loop, batch {batch} (x)", t_loop2 / t_win)


def position_independence(b: Bench, device: torch.device, reps: int) -> None:
    """Tokens/s of the step at position ~2000 vs ~50, block_size 2048 (both slots in one decoder)."""
    model = model_of(device, torch.float32, block_size=2048)
    dec = Decoder(model, num_slots=2)
    early, late = dec.allocate(), dec.allocate()
    v = model.config.vocab_size
    dec.prefill([early, late], [random_prompts(1, 50, v, 1)[0], random_prompts(1, 2000, v, 2)[0]])
    tok = torch.zeros(1, dtype=torch.long, device=device)
    t_early, t_late = compare(lambda: dec.step([early], tok), lambda: dec.step([late], tok), reps * 8, device)
    b.add("tokens/s at position ~2000 vs ~50, block_size 2048", t_early / t_late, 0.9,
          early_pos=dec.length(early), late_pos=dec.length(late))  # fmt: skip


def prefill_length(b: Bench, device: torch.device, reps: int) -> None:
    """Prefill time of an 8000-token prompt vs a 16-token prompt (tokenization excluded)."""
    model = model_of(device, torch.float32)
    dec = Decoder(model, num_slots=1)
    long, short = random_prompts(1, 8000, model.config.vocab_size, 3)[0], random_prompts(1, 16, 100, 4)[0]

    def run(p: list[int]) -> None:
        s = dec.allocate()
        dec.prefill([s], [p])
        dec.free(s)

    t_long, t_short = compare(lambda: run(long), lambda: run(short), reps * 3, device)
    b.add("prefill time, 8000-token prompt / 16-token prompt", t_long / t_short, 1.5, higher=False)


def state_bytes(b: Bench, device: torch.device | None = None, reps: int = 0) -> None:
    """Decode state per sequence vs a same-size Transformer's KV cache at 1024 tokens (both bf16)."""
    cfg = GAMConfig(**PAPER)
    dec = Decoder(GAM(cfg), num_slots=1, device="cpu", dtype=torch.bfloat16)
    ours = dec.state.bytes_per_sequence()
    kv = 2 * cfg.n_layer * 1024 * cfg.n_embd * 2  # K and V, every layer, 1024 positions, 2 bytes
    b.add("KV-cache bytes at 1024 tokens / GAM decode-state bytes (x)", kv / ours, 100, state_bytes=ours, kv_bytes=kv)


def bookkeeping_overhead(b: Bench, device: torch.device, reps: int, batch: int = 128) -> None:
    """bf16 Decoder.step at batch 128 vs the bare one-token forward of the same weights (no state)."""
    model = model_of(device, torch.bfloat16)
    cfg = model.config
    dec = Decoder(model, num_slots=batch)
    slots = [dec.allocate() for _ in range(batch)]
    dec.prefill(slots, random_prompts(batch, 40, cfg.vocab_size, 5))
    tok = torch.zeros(batch, dtype=torch.long, device=device)
    idx, pos = tok.clone(), torch.full((batch,), 40, device=device)
    hist = torch.zeros(cfg.n_layer, batch, cfg.history, cfg.n_embd, device=device, dtype=torch.bfloat16)

    def bare() -> None:  # embedding + blocks on (B, C) + head, the same ops as the step, no gather/scatter
        with torch.inference_mode():
            step_math(dec.weights, idx, pos, hist, reference)

    def gam_step() -> None:  # the model's readable reference step (GAM.step), for comparison
        with torch.inference_mode():
            model.step(idx, pos, hist)

    t_step, t_bare = compare(lambda: dec.step(slots, tok), bare, reps * 2, device)
    b.add(f"bf16 step at batch {batch} / bare one-token forward (speed, x)", t_bare / t_step, 0.8,
          step_s=t_step, bare_s=t_bare)  # fmt: skip
    t_ref, t_fast = compare(gam_step, bare, reps * 2, device)
    b.add(f"  GAM.step / decode-ready step math, bf16 batch {batch} (speed-up, x)", t_ref / t_fast)
    for bt in (1, 8):
        t_step1, _ = compare(lambda bt=bt: dec.step(slots[:bt], tok[:bt]), lambda: None, reps * 3, device)
        b.add(f"  bf16 decode tokens/s at batch {bt} (absolute, this machine)", bt / t_step1)
    b.add(f"  bf16 decode tokens/s at batch {batch} (absolute, this machine)", batch / t_step)


def twin_decoders(model: GAM, batch: int, seed: int, *options: dict) -> tuple[list[Decoder], list[int]]:
    """One Decoder per options dict over the same model, each with `batch` slots prefilled with the same prompts."""
    decs = [Decoder(model, num_slots=batch, **o) for o in options]
    prompts = random_prompts(batch, 40, model.config.vocab_size, seed)
    slots: list[int] = []
    for d in decs:
        slots = [d.allocate() for _ in range(batch)]
        d.prefill(slots, prompts)
    return decs, slots


def compile_eval(b: Bench, device: torch.device, reps: int) -> None:
    """torch.compile of the step math vs eager, per dtype and batch: adopt only where it is faster."""
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 64):
            decs, slots = twin_decoders(model_of(device, dtype), batch, 6, dict(compile=False), dict(compile=True))
            tok = torch.zeros(batch, dtype=torch.long, device=device)
            t0 = time.perf_counter()
            a, c = (d.step(slots, tok) for d in decs)  # first compiled call compiles
            t_compile = time.perf_counter() - t0
            err = (a - c).abs().max().item()
            eager, comp = (partial(d.step, slots, tok) for d in decs)
            t_eager, t_comp = compare(eager, comp, reps * 2, device)
            name = f"torch.compile speed-up, {str(dtype).split('.')[-1]} batch {batch} (x)"
            b.add(name, t_eager / t_comp, compile_s=round(t_compile, 1), max_abs_diff=err)


def layout_eval(b: Bench, device: torch.device, reps: int) -> None:
    """Decoder.step with contiguous (in, out) weight copies vs transposed views of the parameters."""
    for dtype in (torch.float32, torch.bfloat16):
        model = model_of(device, dtype)
        for batch in (1, 8, 64):
            layouts = dict(weight_layout="view"), dict(weight_layout="contiguous")
            (view, contig), slots = twin_decoders(model, batch, 7, *layouts)
            tok = torch.zeros(batch, dtype=torch.long, device=device)
            t_view, t_contig = compare(
                partial(view.step, slots, tok), partial(contig.step, slots, tok), reps * 3, device
            )
            b.add(f"contiguous weights vs views, {str(dtype).split('.')[-1]} batch {batch} (speed-up, x)",
                  t_view / t_contig)  # fmt: skip


SECTIONS: dict[str, Callable[[Bench, torch.device, int], None]] = {
    "cached": cached_vs_reference_loop,
    "position": position_independence,
    "prefill": prefill_length,
    "state": state_bytes,
    "overhead": bookkeeping_overhead,
    "compile": compile_eval,
    "layout": layout_eval,
}


def describe(device: torch.device) -> dict:
    d = {**machine(), "device": str(device)}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7, help="repeats per side (medians)")
    ap.add_argument("--quick", action="store_true", help="3 repeats: a smoke run")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile vs eager (slow to compile)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()
    device, reps = torch.device(args.device), 3 if args.quick else args.reps
    info = describe(device)
    print(f"machine: {info}", flush=True)
    b = Bench()
    t0 = time.perf_counter()
    only = [s for s in args.only.split(",") if s] or [
        s for s in SECTIONS if s not in ("compile", "layout") or args.compile
    ]
    for name in only:
        SECTIONS[name](b, device, reps)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "<default>") + " python " + " ".join(sys.argv)
    out.write_text(json.dumps(dict(machine=info, command=cmd, reps=reps, results=b.results), indent=2) + "\n")
    print(f"wrote {out} ({info['wall_s']} s)")


if __name__ == "__main__":
    main()
