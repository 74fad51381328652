"""CUDA decode check (issue #5), run by bench/gpu_check.sh: correctness, then step latency per variant.

    python bench/cuda_check.py [--no-compile] [--out bench/results/cuda_check.json]

Correctness (exits 1 if any fails): the step vs the parallel forward (fp32 <= 1e-4 with TF32 off; bf16 within
bf16 tolerance) in both regimes (before and past block_size), CUDA graphs vs eager bit-identical, Triton
kernels vs the PyTorch ones. Latency: paper config, bf16, Decoder.step at batch 1, 8, 64, 256 for eager,
CUDA graphs, graphs + Triton (and graphs + torch.compile), medians over interleaved rounds. Targets (H100,
bf16, graphs): batch 1 <= 100 us, batch 256 <= 300 us.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine
from gam_model.config import GAMConfig
from gam_model.decode import Decoder
from gam_model.model import GAM

PAPER = dict(vocab_size=10000, block_size=256, n_embd=512, n_layer=6, n_slots=512, conv_kernel=3, dropout=0.0)
TARGET_US = {1: 100.0, 256: 300.0}
DEVICE = "cuda"  # --cpu-smoke: "cpu", a smaller model, Triton in its interpreter (checks this script, not CUDA)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def paper_model(seed: int = 0) -> GAM:
    torch.manual_seed(seed)
    m = GAM(GAMConfig(**PAPER)).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values, as the tests use
        for name, p in m.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def reference(model: GAM, seq: list[int]) -> torch.Tensor:
    """Next-token logits after seq from the parallel forward on the last block_size tokens (fp32, CUDA)."""
    with torch.inference_mode():
        return model(torch.tensor([seq[-model.config.block_size :]], device=DEVICE))[0, -1].float()


def correctness(failures: list[str], compile_: bool) -> dict:
    """Teacher-force 4 sequences through each variant; compare with the reference and with each other."""
    torch.backends.cudnn.allow_tf32 = False  # PyTorch's default runs fp32 convs in TF32 (10-bit mantissa)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_model = paper_model().to(DEVICE)
    bs = ref_model.config.block_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 10000, (bs + 24,), generator=g).tolist() for _ in range(4)]
    plens = [1, 30, bs - 8, bs + 4]  # short, mid, crossing block_size during the run, past it
    steps = 16
    refs = [[reference(ref_model, s[: p + t]) for t in range(steps + 1)] for s, p in zip(seqs, plens, strict=True)]
    scale = max(r.abs().max().item() for rr in refs for r in rr)
    out: dict = {}
    variants = {
        (dtype_name, graphs, kernels): (dtype, graphs, kernels, False)
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        for graphs in (False, True)
        for kernels in ("torch", "triton")
    }
    if compile_:
        variants[("fp32", True, "torch+compile")] = (torch.float32, True, "torch", True)
    logits: dict = {}
    for key, (dtype, graphs, kernels, comp) in variants.items():
        name = f"{key[0]} graphs={graphs} kernels={key[2]}: step vs parallel forward"
        try:
            dec = Decoder(paper_model(), num_slots=8, device=DEVICE, dtype=dtype, cuda_graphs=graphs, kernels=kernels,
                          compile=comp)  # fmt: skip
            slots = [dec.allocate() for _ in seqs]
            rows = [dec.prefill(slots, [s[:p] for s, p in zip(seqs, plens, strict=True)])]
            for t in range(steps):
                rows.append(dec.step(slots, torch.tensor([s[p + t] for s, p in zip(seqs, plens, strict=True)])))
        except Exception as e:  # one broken variant must not hide the others' results
            print(f"  {name:<62} ERROR {type(e).__name__}: {e}", flush=True)
            failures.append(f"{name}: {type(e).__name__}")
            continue
        logits[key] = torch.stack(rows)  # (steps+1, 4, V)
        err = max((rows[t][i] - refs[i][t]).abs().max().item() for t in range(steps + 1) for i in range(4))
        tol = 1e-4 if dtype == torch.float32 else 0.05 * scale + 0.02
        out[name] = dict(max_abs_diff=err, tol=tol)
        print(f"  {name:<62} max|diff| {err:.2e} (tol {tol:.1e}) {'OK' if err <= tol else 'FAIL'}", flush=True)
        if err > tol:
            failures.append(name)
    for dtype_name in ("fp32", "bf16"):
        for kernels in ("torch", "triton"):
            pair = (dtype_name, False, kernels), (dtype_name, True, kernels)
            if not all(k in logits for k in pair):
                continue
            same = torch.equal(logits[pair[0]], logits[pair[1]])
            name = f"{dtype_name} kernels={kernels}: CUDA graphs vs eager bit-identical"
            out[name] = same
            print(f"  {name:<62} {'OK' if same else 'FAIL'}", flush=True)
            if not same:
                failures.append(name)
        pair = (dtype_name, True, "triton"), (dtype_name, True, "torch")
        if not all(k in logits for k in pair):
            continue
        d = (logits[pair[0]] - logits[pair[1]]).abs().max().item()
        tol = 1e-4 if dtype_name == "fp32" else 0.05 * scale + 0.02
        name = f"{dtype_name}: Triton kernels vs PyTorch kernels"
        out[name] = dict(max_abs_diff=d, tol=tol)
        print(f"  {name:<62} max|diff| {d:.2e} {'OK' if d <= tol else 'FAIL'}", flush=True)
        if d > tol:
            failures.append(name)
    return out


def latency(compile_: bool, rounds: int = 5, steps: int = 20) -> dict:
    """Median Decoder.step latency (us) per variant and batch, paper config bf16; variants interleaved."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    specs = {"eager": dict(cuda_graphs=False, kernels="torch"), "graphs": dict(cuda_graphs=True, kernels="torch"),
             "graphs+triton": dict(cuda_graphs=True, kernels="triton")}  # fmt: skip
    if compile_:  # compiles once per bucket shape (dynamic=False): measured at two batches to stay in budget
        specs["graphs+compile"] = dict(cuda_graphs=True, kernels="torch", compile=True)
    decs: dict[str, Decoder] = {}
    for name, kw in specs.items():
        t0 = time.perf_counter()
        dec = Decoder(paper_model(), num_slots=256, device=DEVICE, dtype=torch.bfloat16, **kw)
        for _ in range(256):
            dec.allocate()
        if not kw.get("compile"):
            dec.warmup()  # capture every bucket up front, as the server does
        decs[name] = dec
        print(f"  {name}: built + captured in {time.perf_counter() - t0:.1f} s", flush=True)
    res: dict = {}
    g = torch.Generator().manual_seed(1)
    for b in (1, 8, 64, 256):
        tok = torch.randint(0, 10000, (b,), generator=g).to(DEVICE)
        slots = list(range(b))
        live = {n: d for n, d in decs.items() if n != "graphs+compile" or b in (1, 256)}
        for name, dec in list(live.items()):
            dec.prefill(list(range(256)), torch.randint(0, 10000, (256, 40), generator=g).tolist())  # pos 40
            t0 = time.perf_counter()
            try:
                dec.step(slots, tok)  # first use of the bucket (compiles, if compiled)
                sync()
            except Exception as e:  # report a failing variant, keep measuring the others
                print(f"  {name} failed at batch {b}: {type(e).__name__}: {e}", flush=True)
                del live[name], decs[name]
                continue
            if time.perf_counter() - t0 > 1:
                print(f"  ({name}, batch {b}: first step {time.perf_counter() - t0:.1f} s)", flush=True)
        times: dict[str, list[float]] = {n: [] for n in live}
        for _ in range(rounds):  # positions stay < 40 + rounds*steps + 1 < block_size: the cached regime
            for name, dec in live.items():
                for _ in range(steps):
                    sync()
                    t0 = time.perf_counter()
                    dec.step(slots, tok)
                    sync()
                    times[name].append(time.perf_counter() - t0)
        row = {n: statistics.median(t) * 1e6 for n, t in times.items()}
        res[b] = row
        cells = "  ".join(f"{n} {us:7.1f} us ({b / us * 1e6:9.0f} tok/s)" for n, us in row.items())
        tgt = f"  [target graphs <= {TARGET_US[b]:.0f} us]" if b in TARGET_US else ""
        print(f"  batch {b:>3}: {cells}{tgt}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the graphs + torch.compile variant")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cuda_check.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="run this script's code paths on CPU (small model)")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        PAPER.update(vocab_size=10000, block_size=256, n_embd=32, n_layer=2, n_slots=16)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported
        args.out = args.out.replace(".json", "_cpu_smoke.json")
    elif not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device")
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (cpu smoke run)"
    info = {**machine(), "gpu": gpu, "cuda": torch.version.cuda}
    print(f"machine: {info}", flush=True)
    failures: list[str] = []
    print("correctness (paper config, 4 sequences, before/across/past block_size):", flush=True)
    corr = correctness(failures, not args.no_compile)
    print("decode step latency (paper config, bf16, median us per Decoder.step incl. host overhead):", flush=True)
    lat = latency(not args.no_compile)
    best = {b: min(lat[b].get("graphs", 1e9), lat[b].get("graphs+triton", 1e9)) for b in TARGET_US}
    targets = {b: dict(us=best[b], target_us=t, met=best[b] <= t) for b, t in TARGET_US.items()}
    for b, t in targets.items():
        print(f"target batch {b}: {t['us']:.1f} us <= {t['target_us']:.0f} us: {'OK' if t['met'] else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=info, correctness=corr, failures=failures, latency_us=lat,
                                   targets=targets), indent=2, default=str) + "\n")  # fmt: skip
    print(f"wrote {out}; correctness failures: {failures or 'none'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
