"""Deterministic (batch-invariant) mode vs the default mode: throughput side by side, and how far the default
mode's rows move with the batch (issue #12, part 3).

    OMP_NUM_THREADS=1 .venv/bin/python bench/deterministic.py [--model DIR] [--rows 8 16 64] [--quick] [--only invariance]

Bundled model (else --model, else the paper config with random weights), fp32 and bf16, on one Decoder pool of
max(--batches) slots per mode. Throughput: tokens/s of Decoder.step in a loop and prompts/s of Decoder.prefill
(prompts of 20-60 tokens of real text), at batch 1, 8 and 64; the modes alternate call by call (A, B, A, B, ...)
so a noisy machine slows both alike; medians of --reps repeats. --rows adds deterministic variants with other
fixed row counts (the default is Decoder's own). Invariance: for --invariance-prompts prompts, how many rows'
prefill + step logits differ alone vs in one batch of them all, the largest difference, and how many seeded
generations (temperature 1) differ alone vs beside the others, in each mode. Writes
bench/results/deterministic.json with the machine described. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, prompt_corpus, served_model
from gam_model.checkpoint import load_checkpoint
from gam_model.decode import Decoder
from gam_model.model import GAM
from gam_model.sampling import SamplingParams, SequenceSampler, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def alternate(fns: Sequence[Callable[[], object]], reps: int, device: torch.device, warmup: int = 2) -> list[float]:
    """Median seconds per call of each fn, the calls alternated (fn0, fn1, ..., fn0, fn1, ...)."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, out in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def corpus_prompts(ids: list[int], n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 20-60 tokens cut from the tokenized corpus at spread-out offsets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 61, (n,), generator=g).tolist()
    starts = torch.randint(0, len(ids) - 61, (n,), generator=g).tolist()
    return [ids[s : s + k] for s, k in zip(starts, lengths, strict=True)]


def throughput(model: GAM, dtype: torch.dtype, device: torch.device, ids: list[int], args: argparse.Namespace) -> list:
    """tokens/s of step and prompts/s of prefill per mode and batch size, modes alternated."""
    pool = max(args.batches)
    modes: dict[str, dict] = {"default": {}, "deterministic": dict(deterministic=True)}
    for r in args.rows:
        modes[f"deterministic, fixed_rows={r}"] = dict(deterministic=True, fixed_rows=r)
    decs = {name: Decoder(model, pool, device, dtype, **kw) for name, kw in modes.items()}
    prompts = corpus_prompts(ids, pool, seed=1)
    slots = {name: [d.allocate() for _ in range(pool)] for name, d in decs.items()}
    out = []
    for b in args.batches:
        for name, d in decs.items():  # fresh positions, well inside block_size for every timed step
            d.prefill(slots[name], prompts)
        tok = torch.zeros(b, dtype=torch.long, device=device)

        def loop(d: Decoder, s: list[int], b: int = b, tok: torch.Tensor = tok) -> None:
            for _ in range(args.steps):
                d.step(s[:b], tok)

        def pre(d: Decoder, s: list[int], b: int = b) -> None:
            d.prefill(s[:b], prompts[:b])

        t_step = alternate([lambda d=d, s=slots[n]: loop(d, s) for n, d in decs.items()], args.reps, device)
        t_pre = alternate([lambda d=d, s=slots[n]: pre(d, s) for n, d in decs.items()], args.reps, device)
        base_step, base_pre = t_step[0], t_pre[0]
        for (name, d), ts, tp in zip(decs.items(), t_step, t_pre, strict=True):
            row = dict(
                dtype=str(dtype).removeprefix("torch."),
                batch=b,
                mode=name,
                fixed_rows=d.fixed_rows,
                step_tokens_per_s=round(b * args.steps / ts, 1),
                prefill_prompts_per_s=round(b / tp, 1),
                step_throughput_vs_default=round(base_step / ts, 3),
                prefill_throughput_vs_default=round(base_pre / tp, 3),
            )
            out.append(row)
            print(
                f"{row['dtype']:<9} batch {b:>3}  {name:<30} step {row['step_tokens_per_s']:>9.1f} tok/s "
                f"({row['step_throughput_vs_default']:.3f} x default)   prefill {row['prefill_prompts_per_s']:>8.1f} "
                f"prompts/s ({row['prefill_throughput_vs_default']:.3f} x default)",
                flush=True,
            )
    return out


def run_rows(dec: Decoder, prompts: list[list[int]], seeds: list[int], steps: int) -> tuple[list, list]:
    """Prefill + `steps` seeded sampling steps of these prompts together: per prompt (logits (T, V), tokens)."""
    V = dec.config.vocab_size
    slots = [dec.allocate() for _ in prompts]
    rows = [SequenceSampler(SamplingParams(temperature=1.0, seed=s), p, V) for s, p in zip(seeds, prompts, strict=True)]
    logits = dec.prefill(slots, prompts)
    seen: list[list[torch.Tensor]] = [[] for _ in prompts]
    toks: list[list[int]] = [[] for _ in prompts]
    for t in range(steps + 1):
        out = sample(logits, rows)
        for i, r in enumerate(rows):
            r.observe(int(out.tokens[i]))
            seen[i].append(logits[i].cpu())
            toks[i].append(int(out.tokens[i]))
        if t < steps:
            logits = dec.step(slots, out.tokens)
    for s in slots:
        dec.free(s)
    return [torch.stack(x) for x in seen], toks


def invariance(model: GAM, dtype: torch.dtype, device: torch.device, ids: list[int], args: argparse.Namespace) -> list:
    """Per mode: seeded generations (temperature 1) whose tokens differ alone vs in one batch of them all; rows whose
    logits differ while both runs have fed the same tokens, and the largest such difference."""
    n = args.invariance_prompts
    prompts = corpus_prompts(ids, n, seed=2)
    seeds = list(range(100, 100 + n))
    out = []
    for name, kw in (("default", {}), ("deterministic", dict(deterministic=True))):
        dec = Decoder(model, n, device, dtype, **kw)
        alone = [run_rows(dec, [p], [s], args.gen_tokens) for p, s in zip(prompts, seeds, strict=True)]
        together = run_rows(dec, prompts, seeds, args.gen_tokens)
        diff = []
        for (a_logits, a_toks), t_logits, t_toks in zip(alone, *together, strict=True):
            same = next((i for i, (x, y) in enumerate(zip(a_toks[0], t_toks, strict=True)) if x != y), len(t_toks))
            # logits at step t follow tokens 0..t-1: compare while both runs have fed the same tokens
            diff.append(float((a_logits[0][: same + 1] - t_logits[: same + 1]).abs().max()))
        row = dict(
            dtype=str(dtype).removeprefix("torch."),
            mode=name,
            prompts=n,
            batch=n,
            rows_with_different_logits=sum(d > 0 for d in diff),
            max_abs_logit_diff=max(diff),
            generations_with_different_tokens=sum(a[1][0] != t for a, t in zip(alone, together[1], strict=True)),
            generated_tokens=args.gen_tokens + 1,
        )
        out.append(row)
        print(
            f"{row['dtype']:<9} {name:<14} {n} prompts alone vs together: {row['rows_with_different_logits']} rows' "
            f"logits differ (max {row['max_abs_logit_diff']:.3g}); {row['generations_with_different_tokens']} of "
            f"{n} seeded {row['generated_tokens']}-token generations differ",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--rows", nargs="*", type=int, default=[], help="extra deterministic variants: fixed_rows")
    ap.add_argument("--reps", type=int, default=7, help="repeats per mode (medians)")
    ap.add_argument("--steps", type=int, default=8, help="Decoder.step calls per timed loop")
    ap.add_argument("--invariance-prompts", type=int, default=32, help="0: skip the invariance measurement")
    ap.add_argument("--gen-tokens", type=int, default=31, help="sampled tokens after the first (invariance)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 8 invariance prompts: a smoke run")
    ap.add_argument("--only", choices=["throughput", "invariance"], help="run one of the two measurements")
    ap.add_argument("--out", type=Path, default=RESULTS / "deterministic.json")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.invariance_prompts = 3, min(args.invariance_prompts, 8)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, origin = served_model(args.model, Path(tmp))
        model, tok, _ = load_checkpoint(model_dir)
    ids = tok.encode(prompt_corpus())
    print(f"model: {model_dir.name} ({origin}); {torch.get_num_threads()} torch threads", flush=True)
    results: dict[str, list] = {"throughput": [], "invariance": []}
    for name in args.dtypes if args.only != "invariance" else []:
        results["throughput"] += throughput(model, DTYPES[name], device, ids, args)
    if args.invariance_prompts and args.only != "throughput":
        for name in args.dtypes:
            results["invariance"] += invariance(model, DTYPES[name], device, ids, args)
    info = machine() | {"device": str(device), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    cmd = " ".join(["python", *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(machine=info, command=cmd, model=model_dir.name, model_origin=origin, reps=args.reps,
               steps_per_loop=args.steps, results=results)  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
