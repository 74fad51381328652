"""Quantized serving (issue #14): int8 vs bf16 side by side in one run, medians of alternated repeats.

    .venv/bin/python bench/quantize.py [--threads 2] [--chars 200000] [--reps 9] [--quick]

- quality: the bundled model on WikiText-2 valid (../shared/data/wikitext-2/valid.txt, its first --chars characters;
  0 = all), exact sliding eval (gam_model.evaluate): bits per byte of fp32, bf16 and int8 (bf16 activations); and
  KL(bf16 || int8) per token, on the bundled model (valid text) and on the paper config with random weights.
- speed: Decoder.step, paper config, random weights, int8 vs bf16 at batch 1..256 (alternated), and the crossover;
  at batch 1 also the projections alone and the whole step with one thread (where the batch-1 ratio goes).
- memory: bytes of the distinct tensor storages the Decoder holds (model + fused step weights), int8 vs bf16.
- checkpoint: gam-quantize's file vs the original, and load time pre-quantized vs quantize-at-load.
Writes bench/results/quantize.json with the machine described. Not a test: a missed goal is reported, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bundled_model_dir, machine
from bench.decode import PAPER, Bench, compare, model_of, random_prompts
from gam_model.checkpoint import load_checkpoint
from gam_model.cli.quantize import main as gam_quantize
from gam_model.data import encode_stream, read_text
from gam_model.decode import Decoder
from gam_model.evaluate import evaluate_text
from gam_model.model import GAM
from gam_model.quant import quantize_model_
from gam_model.step import StepWeights

VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
CPU = torch.device("cpu")


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p || q), logits (N, V)."""
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def quality(b: Bench, model_dir: Path, chars: int) -> None:
    text = read_text(VALID)
    text = text[:chars] if chars else text
    b.add(f"  (valid.txt: {len(text):,} of its characters)", len(text))
    bpb = {}
    for name, dtype, method in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                                ("int8", torch.bfloat16, "int8")):  # fmt: skip
        model, tok, _ = load_checkpoint(model_dir, CPU, dtype, method)
        t0 = time.perf_counter()
        r = evaluate_text(model, tok, text)
        bpb[name] = r.bits_per_byte
        b.add(f"bundled model, valid bits per byte, {name}", r.bits_per_byte, tokens=r.tokens,
              perplexity=r.perplexity, seconds=time.perf_counter() - t0)  # fmt: skip
    b.add("  int8 - bf16 bits per byte (x1000)", 1000 * (bpb["int8"] - bpb["bf16"]), 10, higher=False)
    b.add("  bf16 - fp32 bits per byte (x1000, for scale)", 1000 * (bpb["bf16"] - bpb["fp32"]))
    # KL on real text: logits of the first block_size positions of a few valid-text windows
    ids = torch.from_numpy(encode_stream(tok, text))
    bf16, _, _ = load_checkpoint(model_dir, CPU, torch.bfloat16, "none")
    int8, _, _ = load_checkpoint(model_dir, CPU, torch.bfloat16, "int8")
    bs = bf16.config.block_size
    windows = ids[: (len(ids) // bs) * bs].view(-1, bs)[:4]  # (4, block_size)
    with torch.inference_mode():
        kl = kl_per_token(bf16(windows).flatten(0, 1), int8(windows).flatten(0, 1))
    b.add(f"bundled model, KL(bf16 || int8) per token, {windows.numel()} valid tokens (millinats)", 1000 * kl)


def paper_kl(b: Bench) -> None:
    bf16 = model_of(CPU, torch.bfloat16)
    int8 = quantize_model_(model_of(CPU, torch.bfloat16), "int8")
    idx = torch.tensor(random_prompts(4, PAPER["block_size"], PAPER["vocab_size"], seed=0))  # (4, 256)
    with torch.inference_mode():
        kl = kl_per_token(bf16(idx).flatten(0, 1), int8(idx).flatten(0, 1))
    b.add(f"paper config, random weights, KL(bf16 || int8) per token, {idx.numel()} tokens (millinats)", 1000 * kl)


STEPS = 4  # decode steps per timed sample


def step_times(models: tuple[GAM, GAM], batch: int, reps: int) -> tuple[float, float]:
    """Median seconds per Decoder.step of the two models at `batch` rows, alternated."""
    decs = [Decoder(m, num_slots=batch) for m in models]
    slots = [[d.allocate() for _ in range(batch)] for d in decs]
    prompts = random_prompts(batch, 4, PAPER["vocab_size"], seed=batch)
    tok = torch.zeros(batch, dtype=torch.long)

    def run(i: int) -> None:
        d, s = decs[i], slots[i]
        if d.length(s[0]) + STEPS >= PAPER["block_size"] - 1:  # prefills keep every row below block_size
            d.prefill(s, prompts)
        for _ in range(STEPS):
            d.step(s, tok)

    for d, s in zip(decs, slots, strict=True):
        d.prefill(s, prompts)
    ta, tb = compare(lambda: run(0), lambda: run(1), reps, CPU)
    return ta / STEPS, tb / STEPS


def speed(b: Bench, reps: int, batches: list[int]) -> None:
    """Decoder.step per batch size: int8 (bf16 activations) vs bf16, both with the same random paper-config weights."""
    models = (model_of(CPU, torch.bfloat16), quantize_model_(model_of(CPU, torch.bfloat16), "int8"))
    crossover = None
    for batch in batches:
        t_bf16, t_int8 = step_times(models, batch, reps if batch <= 64 else max(3, reps // 2))
        ratio = t_bf16 / t_int8
        target = 1.6 if batch == 1 else None
        b.add(f"decode step, int8 vs bf16 speed-up, batch {batch} (x)", ratio, target,
              bf16_step_s=t_bf16, int8_step_s=t_int8)  # fmt: skip
        if crossover is None and ratio < 1.0:
            crossover = batch
    b.add("  smallest measured batch where int8 is slower than bf16 (0 = none)", crossover or 0)


def batch1_anatomy(b: Bench, reps: int) -> None:
    """Where the batch-1 ratio goes: the step's projections alone (its GEMMs, no other op) and the whole step with one
    thread (no two-thread parallel region to wait on), int8 vs bf16, side by side."""
    models = (model_of(CPU, torch.bfloat16), quantize_model_(model_of(CPU, torch.bfloat16), "int8"))
    C, S = PAPER["n_embd"], PAPER["n_slots"]
    g = torch.Generator().manual_seed(0)
    h, f = torch.randn(1, C, generator=g).bfloat16(), torch.randn(1, 4 * C, generator=g).bfloat16()  # (1, C), (1, 4C)
    p = torch.randn(1, S, generator=g).softmax(-1).bfloat16()  # (1, S)

    def projections(w: StepWeights) -> Callable[[], None]:
        def run() -> None:
            for lw in w.layers:
                lw.gm(h), lw.read(p), lw.ffn1(h), lw.ffn2(f)
            w.head(h)

        return run

    with torch.inference_mode():
        wb, wi = (Decoder(m, num_slots=1).weights for m in models)
        ta, tb = compare(projections(wb), projections(wi), reps * 5, CPU)
    b.add("batch 1, the step's projections alone (4 per layer + head), int8 vs bf16 (x)", ta / tb,
          bf16_s=ta, int8_s=tb)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_bf16, t_int8 = step_times(models, 1, reps * 3)
    finally:
        torch.set_num_threads(threads)
    b.add("batch 1, whole decode step with 1 thread, int8 vs bf16 (x)", t_bf16 / t_int8,
          bf16_step_s=t_bf16, int8_step_s=t_int8)  # fmt: skip


def fp32_speed(b: Bench, reps: int) -> None:
    """int8 with float32 activations vs the float32 step (the CPU default dtype), batch 1: reported, no goal."""
    fp32 = model_of(CPU, torch.float32)
    int8 = quantize_model_(model_of(CPU, torch.float32), "int8")
    decs = [Decoder(m, num_slots=1) for m in (fp32, int8)]
    slots = [[d.allocate()] for d in decs]
    for d, s in zip(decs, slots, strict=True):
        d.prefill(s, [[1, 2, 3]])
    tok = torch.zeros(1, dtype=torch.long)

    def run(i: int) -> None:
        if decs[i].length(slots[i][0]) > 200:
            decs[i].prefill(slots[i], [[1, 2, 3]])
        decs[i].step(slots[i], tok)

    t32, t8 = compare(lambda: run(0), lambda: run(1), reps * 3, CPU)
    b.add("decode step, int8 with float32 activations vs float32, batch 1 (x)", t32 / t8)


def held_bytes(dec: Decoder) -> dict[str, int]:
    """Bytes of the distinct tensor storages a Decoder holds for weights (model + fused step weights), by kind."""
    seen: dict[int, torch.Tensor] = {}

    def visit(x: object) -> None:
        if isinstance(x, torch.Tensor):
            seen.setdefault(x.untyped_storage().data_ptr(), x)
        elif hasattr(x, "__dataclass_fields__"):
            for f in x.__dataclass_fields__:
                visit(getattr(x, f))
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    visit([*dec.model.parameters(), *dec.model.buffers()])
    visit(dec.weights)
    out = {"total": 0, "int8": 0, "float": 0}
    for t in seen.values():
        n = t.untyped_storage().nbytes()
        out["total"] += n
        out["int8" if t.dtype == torch.int8 else "float"] += n
    return out


RSS_CHILD = """
import gc, sys, psutil, torch
sys.path.insert(0, sys.argv[1])
from bench.decode import model_of
from gam_model.decode import Decoder
from gam_model.quant import quantize_model_
torch.set_num_threads(1)
Decoder(model_of(torch.device("cpu"), torch.bfloat16, n_layer=1, n_embd=64, vocab_size=64), num_slots=1)  # warm-up
gc.collect()
before = psutil.Process().memory_info().rss
model = model_of(torch.device("cpu"), torch.bfloat16)
if sys.argv[2] != "none":
    quantize_model_(model, sys.argv[2])
dec = Decoder(model, num_slots=1)
gc.collect()
print(psutil.Process().memory_info().rss - before)
"""


def process_bytes(method: str) -> int:
    """RSS growth of a fresh process that builds the paper-config Decoder (bf16 activations, `method` weights).

    glibc is told to mmap every allocation of 64 KiB or more, so a freed tensor (the float32 init, the weights that
    quantization replaces) goes back to the system and the figure counts what stays resident."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, root, method], env=env, check=True, capture_output=True)
    return int(out.stdout.split()[-1])


def memory(b: Bench) -> None:
    bf16 = held_bytes(Decoder(model_of(CPU, torch.bfloat16), num_slots=1))
    int8 = held_bytes(Decoder(quantize_model_(model_of(CPU, torch.bfloat16), "int8"), num_slots=1))
    params = sum(p.numel() for p in model_of(CPU, torch.bfloat16).parameters()) * 2
    b.add("decoder weight bytes, int8 / bf16 (paper config)", int8["total"] / bf16["total"], 0.55, higher=False,
          int8=int8, bf16=bf16, bf16_parameters_only=params)  # fmt: skip
    b.add("  int8 decoder / bf16 parameters alone (no fused copy)", int8["total"] / params)
    rss = {m: process_bytes(m) for m in ("none", "int8")}
    b.add("  process RSS growth building the Decoder, int8 / bf16", rss["int8"] / rss["none"], 0.55, higher=False,
          int8=rss["int8"], bf16=rss["none"])  # fmt: skip


def checkpoint(b: Bench, model_dir: Path, reps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "int8"
        gam_quantize([str(model_dir), str(dst)])
        size = (dst / "model.safetensors").stat().st_size / (model_dir / "model.safetensors").stat().st_size
        b.add("bundled model: pre-quantized model.safetensors / original", size)

        def at_load() -> None:
            load_checkpoint(model_dir, CPU, torch.bfloat16, "int8")

        def stored() -> None:
            load_checkpoint(dst, CPU)

        t_load, t_stored = compare(at_load, stored, reps, CPU)
        b.add("  load time, quantize-at-load / pre-quantized (x)", t_load / t_stored)


class SavedBench(Bench):
    """Bench that rewrites its JSON after every result, so a long run that is stopped keeps what it measured."""

    def __init__(self, out: Path, header: dict) -> None:
        super().__init__()
        self.out, self.header = out, header

    def add(self, *args, **kwargs) -> None:
        super().add(*args, **kwargs)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(dict(**self.header, results=self.results), indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chars", type=int, default=200_000, help="valid.txt prefix to score (0 = all)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--quick", action="store_true", help="few repeats, short text: a smoke run")
    ap.add_argument("--only", choices=["quality", "speed", "memory", "checkpoint"], nargs="+", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps, chars = (3, 20_000) if args.quick else (args.reps, args.chars)
    info = machine()
    print(f"machine: {info}", flush=True)
    header = dict(machine=info, command=" ".join(sys.argv), reps=reps, chars=chars)
    b, only = SavedBench(Path(args.out), header), set(args.only or ["quality", "speed", "memory", "checkpoint"])
    bundled = bundled_model_dir()
    if "memory" in only:
        memory(b)
    if "speed" in only:
        speed(b, reps, args.batches)
        batch1_anatomy(b, reps)
        fp32_speed(b, reps)
    if "checkpoint" in only and bundled is not None:
        checkpoint(b, bundled, reps)
    if "quality" in only:
        paper_kl(b)
        if bundled is not None and VALID.is_file():
            quality(b, bundled, chars)
        else:
            print(f"no bundled model or no {VALID}: bundled-model quality skipped", flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
