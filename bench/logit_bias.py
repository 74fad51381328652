"""logit_bias cost per sampling step: the sparse add (gam_model.sampling.apply_penalties) vs a dense (B, V) bias row
per request, same result bit for bit; alternated, median of --reps. On the development CPU the dense side is bimodal
from run to run (2.2-2.6 ms or 14-16 ms at the defaults: whether glibc serves its fresh 8 MB stack from mmap, with a
page fault per page, depends on the allocator's state), the sparse side 1.8-2.4 ms: 1.1x to 7.3x over six runs.

    .venv/bin/python bench/logit_bias.py [--batch 256] [--vocab 8192] [--ids 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gam_model.sampling import SamplingParams, SequenceSampler, apply_penalties


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ids", type=int, default=1, help="biased ids per request")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bias = {i: -100.0 for i in range(a.ids)}
    rows = [SequenceSampler(SamplingParams(logit_bias=bias), [], a.vocab) for _ in range(a.batch)]
    logits = torch.randn(a.batch, a.vocab)  # (B, V)
    dense_rows = [torch.zeros(a.vocab) for _ in range(a.batch)]
    for d in dense_rows:
        d[list(bias)] = -100.0

    def dense() -> torch.Tensor:
        return logits + torch.stack(dense_rows)  # (B, V): the earlier implementation

    def sparse() -> torch.Tensor:
        return apply_penalties(logits, rows)

    assert torch.equal(dense(), sparse())
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(a.reps):
        for name, f in (("dense", dense), ("sparse", sparse)):
            t = time.perf_counter()
            for _ in range(20):
                f()
            times[name].append((time.perf_counter() - t) / 20)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    print(f"batch {a.batch}, vocab {a.vocab}, {a.ids} biased id(s) per request, {a.threads} thread(s): "
          f"dense {d * 1e3:.2f} ms, sparse {s * 1e3:.2f} ms per step ({d / s:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
