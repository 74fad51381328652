"""Batched prefill and decode over a slot pool: the exact O(1)-per-token generation path."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from functools import partial
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from gam_model import kernels as kernel_modules
from gam_model.device import to_device
from gam_model.graphs import BucketedStep, bucket_sizes, pad_to
from gam_model.model import GAM
from gam_model.quant import kernel_of, quantization_of
from gam_model.state import DecodeState
from gam_model.step import Proj, StepWeights, hidden, step

__all__ = ["CPU_FIXED_ROWS", "Decoder", "FixedShapeHead", "bucket_sizes", "pad_to"]
log = logging.getLogger(__name__)

CPU_FIXED_ROWS = 8  # deterministic mode's default row count on CPU (bench/deterministic.py --rows)
# tune_threads: the small batches measured on one thread against all, and a step short enough not to bother (a tiny
# model's GEMMs are below what BLAS splits over threads anyway)
ONE_THREAD_CANDIDATES = (1, 2, 4)
TUNE_MIN_STEP_S = 0.002
# one thread is kept while its step is at most this much slower than all threads' alone: serving, the cores it
# frees go to the frontend and the clients, which otherwise stall the forward's other threads (at one stream here,
# a served token took 1.18x the bare 2-thread step; one thread served it at about the step's time)
ONE_THREAD_SLACK = 1.10


def rows_on_one_thread(times: dict[int, tuple[list[float], list[float]]]) -> int:
    """The largest row count up to which one thread was about as fast as all: `times` maps a row count to the step
    times measured (alternated) on one thread and on all; counts are tried in increasing order and the first where
    one thread's median was over ONE_THREAD_SLACK times all threads' ends the run. 0: not even one row."""
    best = 0
    for rows in sorted(times):
        one, every = times[rows]
        if statistics.median(one) > ONE_THREAD_SLACK * statistics.median(every):
            break
        best = rows
    return best


CPU_HEAD_TILE = 512  # deterministic mode on CPU: vocabulary columns per head GEMM (a (C, 512) fp32 tile is 768 KiB)


class FixedShapeHead:
    """The head applied to any number of rows in (rows, C) @ (C, tile) GEMMs only: deterministic mode on CPU.

    An 8-row GEMM against the whole (C, V) head re-reads V*C weights from memory for each chunk of rows (at 64 rows,
    8 times); tile by tile, every chunk reuses the tile while it is in cache. Each GEMM is one fixed shape whatever
    the batch (the last tile narrower when V is not a multiple of `tile`), so a row's bits still depend only on its
    own hidden state and its place in its chunk.
    """

    def __init__(self, head: Proj, vocab_size: int, rows: int, tile: int, dtype: torch.dtype) -> None:
        self.rows, self.dtype = rows, dtype
        self.tiles = [head.columns(lo, min(lo + tile, vocab_size)) for lo in range(0, vocab_size, tile)]

    def __call__(self, h: Tensor) -> Tensor:
        """h (n, C) final hidden states (any float dtype) -> logits (n, V) float32."""
        n, m = h.shape[0], self.rows
        x = torch.cat([h.to(self.dtype), h.new_zeros(-n % m, h.shape[1], dtype=self.dtype)])  # (n padded to m, C)
        chunks = x.split(m)  # each (m, C)
        return torch.cat([torch.cat([p(c) for c in chunks]) for p in self.tiles], 1)[:n].float()  # (n, V)


class Decoder:
    """Owns a model and its DecodeState; prefill admits sequences, step advances any set of slots by one token.

    Logits are returned as float32 (B, V). Rows at positions < block_size take the cached step; rows past it
    take the sliding-window step (DESIGN 1.3). Batches are padded to power-of-two buckets with the scratch
    slot, so every shape the step sees is one of a few static ones (deterministic mode: exactly one).

    Options (keyword-only):
    - cuda_graphs: replay one captured graph per bucket (default: on when the device is CUDA). On CPU, True
      uses the graph runner's CPU stand-in (same buffers and bookkeeping, no speed-up): for tests.
    - kernels: "torch" (reference), "triton" (fused elementwise kernels), "auto" (triton on CUDA when
      importable, else torch), or a module with the same functions as gam_model.kernels.reference.
    - weight_layout: "view" (projections read the (out, in) parameters, as F.linear), "contiguous" (a second,
      (in, out) copy: faster small-batch GEMMs on CPU in fp32, bench/decode.py --only layout), or "auto"
      (contiguous on CPU in fp32, view elsewhere).
    - compile: wrap the cached step's math in torch.compile (static shapes, one compile per bucket). Off by
      default: on the development CPU it gained nothing (bench/decode.py --only compile); on CUDA the GPU
      check (bench/gpu_check.sh) measures it.
    - deterministic: batch-invariant mode. A row's logits (prefill, cached and sliding step) are bit-identical
      whatever else is in the batch: every step and prefill runs at one fixed shape, `fixed_rows` rows (one
      bucket; larger batches run in chunks of it, the last padded) and, for prefill, the full R-token window.
      BLAS picks its kernel and blocking by shape, so only a fixed shape fixes each row's arithmetic; that a
      row's result depends neither on its place in the chunk nor on the padding rows is what
      tests/gam_model/test_deterministic.py checks. On CPU the head runs after the chunks, over all of them, in
      fixed (fixed_rows, C) @ (C, CPU_HEAD_TILE) GEMMs (FixedShapeHead). Costs throughput (README,
      bench/deterministic.py).
    - fixed_rows: the row count M0 of deterministic mode; rows past the batch (and past the pool, if M0 is
      larger) are the scratch slot. Default: the whole pool on CUDA (one captured graph per regime; a GPU step
      costs about the same at any small batch), CPU_FIXED_ROWS on CPU, whatever the pool: on the development
      CPU MKL keeps a row's bits independent of its place only at multiples of 4 rows.
    """

    def __init__(
        self,
        model: GAM,
        num_slots: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        cuda_graphs: bool | None = None,
        kernels: str | ModuleType = "auto",
        compile: bool = False,
        weight_layout: str = "auto",
        deterministic: bool = False,
        fixed_rows: int | None = None,
    ) -> None:
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        self.model = model.to(self.device, self.dtype).eval()
        self.config = model.config
        self.state = DecodeState(self.config, num_slots, self.device, self.dtype)
        self.tokens_prefilled = 0  # tokens pushed through the model by prefill (work, padding included)

        on_cuda = self.device.type == "cuda"
        if fixed_rows is not None and not deterministic:
            raise ValueError("fixed_rows is the row count of deterministic mode: pass deterministic=True")
        if deterministic:
            if fixed_rows is None:
                fixed_rows = num_slots if on_cuda else CPU_FIXED_ROWS
            if fixed_rows < 1:
                raise ValueError(f"fixed_rows must be >= 1, got {fixed_rows}")
        self.deterministic = deterministic
        self.fixed_rows = fixed_rows  # None unless deterministic
        self.buckets = [fixed_rows] if fixed_rows else bucket_sizes(num_slots)
        if kernels == "auto":
            kernels = "triton" if on_cuda and kernel_modules.usable_on(self.device, self.dtype) else "torch"
        ops = kernels if isinstance(kernels, ModuleType) else kernel_modules.load(kernels)
        self.kernels = kernels if isinstance(kernels, str) else ops.__name__
        if weight_layout == "auto":
            weight_layout = "contiguous" if self.device.type == "cpu" and self.dtype == torch.float32 else "view"
        if weight_layout not in ("view", "contiguous"):
            raise ValueError(f"weight_layout must be 'auto', 'view' or 'contiguous', got {weight_layout!r}")
        self.weight_layout = weight_layout
        self.weights = StepWeights.from_model(self.model, contiguous=weight_layout == "contiguous")
        # quantized weights (gam_model.quant) run in every path: graphs capture and Triton fuses around them
        self.quantization = quantization_of(self.model)
        if self.quantization != "none":
            log.info(
                "%s weights, %s activations: %s",
                self.quantization,
                self.dtype,
                kernel_of(self.quantization, self.device),
            )
        # deterministic on CPU: the runners return the final hidden states and the head runs after them, tiled
        self._head = None
        if deterministic and self.device.type == "cpu":
            assert fixed_rows is not None  # set above
            V = self.config.vocab_size
            self._head = FixedShapeHead(self.weights.head, V, fixed_rows, CPU_HEAD_TILE, self.dtype)
        self._width = self.config.n_embd if self._head else self.config.vocab_size  # what the runners return per row
        math = partial(hidden if self._head else step, self.weights, ops=ops)
        self._math = torch.compile(math, dynamic=False) if compile else math
        self.compiled = compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        graphs = ("cuda" if on_cuda else "replay") if self.cuda_graphs else None
        pool = torch.cuda.graph_pool_handle() if graphs == "cuda" else None  # one pool for every graph
        self._cached = BucketedStep(self.cached_step, self.buckets, self.state.scratch, self.device, graphs, pool)
        self._window = BucketedStep(self.window_step, self.buckets, self.state.scratch, self.device, graphs, pool)
        # CPU: steps of at most this many rows run on one torch thread, larger ones and prefill on all (tune_threads)
        self.one_thread_rows = 0
        self._threads = torch.get_num_threads()  # all: what this process had when the decoder was made
        self._threads_now = self._threads

    # -- slots -------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        return self.state.allocate()

    def free(self, slot: int) -> None:
        self.state.free(slot)

    def length(self, slot: int) -> int:
        return int(self.state.lengths[slot])

    def warmup(self) -> None:
        """Capture every bucket's graphs now (both regimes) instead of on first use; no-op without graphs."""
        with torch.inference_mode():
            self._cached.capture_all()
            self._window.capture_all()

    def tune_threads(self, reps: int = 5) -> int:
        """On CPU with several torch threads, outside deterministic mode: time the cached step at 1, 2 and 4 rows
        on one thread and on all (alternated, `reps` each); from now on a step of up to the largest row count whose
        one-thread time was about as fast runs on one thread (`rows_on_one_thread`), unless a row is past block_size
        (a window forward, not the step timed here); prefill and the core's scoring run on all (`all_threads`).
        A small batch's GEMMs are memory-bound GEMVs: where more threads do not pull more bandwidth, they only add
        barriers, and a serving host's other cores go to its HTTP frontend and clients instead (README, host path).
        Not in deterministic mode, whose bits are per thread count; not for a step under TUNE_MIN_STEP_S on either
        count. Returns that row count."""
        self.one_thread_rows = 0
        threads = self._threads
        if self.device.type != "cpu" or self.deterministic or threads < 2:
            return 0
        times: dict[int, tuple[list[float], list[float]]] = {}
        for rows in ONE_THREAD_CANDIDATES:
            if rows > self.state.free_slots:
                break
            slots = [self.allocate() for _ in range(rows)]
            try:
                self.prefill(slots, [[0]] * rows)
                tokens = torch.zeros(rows, dtype=torch.long)
                self.step(slots, tokens)  # warm at this shape
                one: list[float] = []
                every: list[float] = []
                for _ in range(reps):
                    for n, out in ((1, one), (threads, every)):
                        torch.set_num_threads(n)
                        start = time.perf_counter()
                        self.step(slots, tokens)
                        out.append(time.perf_counter() - start)
            finally:
                torch.set_num_threads(threads)
                self._threads_now = threads  # a second call: the count _use_threads set before is gone
                for slot in slots:
                    self.free(slot)
            # the faster count's median: on a busy host all threads' step stalls at its barriers (a tiny model's
            # 0.5 ms step read 15-160 ms on two threads while another process ran), which is no measure of the step
            if rows == 1 and min(statistics.median(one), statistics.median(every)) < TUNE_MIN_STEP_S:
                return 0
            times[rows] = (one, every)
        self.one_thread_rows = rows_on_one_thread(times)
        summary = ", ".join(
            f"{r} rows {statistics.median(o) * 1e3:.2f} / {statistics.median(e) * 1e3:.2f} ms"
            for r, (o, e) in times.items()
        )  # fmt: skip
        log.info("CPU steps of up to %d rows run on one thread (1 / %d threads: %s)", self.one_thread_rows, threads,
                 summary)  # fmt: skip
        return self.one_thread_rows

    def all_threads(self) -> None:
        """Run what comes next on every thread: work that is not a small cached step (prefill, the core's prompt
        scoring), which would otherwise inherit the one thread the last small step left (tune_threads)."""
        self._use_threads(self._threads)

    def _use_threads(self, threads: int) -> None:
        """Set torch's thread count (tune_threads); a no-op when it is already that or nothing was tuned."""
        if self.one_thread_rows and threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> Tensor:
        """Reset `slots` and feed each its prompt; returns next-token logits (B, V). O(R) work per prompt."""
        if len(slots) != len(prompts) or not slots:
            raise ValueError("prefill needs one non-empty prompt per slot")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        R, m = self.config.receptive_field, self.fixed_rows
        self.all_threads()  # prefill on every thread
        if m is None:  # one window batch, as wide as the longest prompt needs
            return self._prefill(slots, prompts, min(R, max(len(p) for p in prompts)), len(slots))
        # deterministic: every window batch is (fixed_rows, R), whatever prompts share it
        out = torch.cat([self._prefill(slots[i : i + m], prompts[i : i + m], R, m) for i in range(0, len(slots), m)])
        return self._head(out) if self._head else out

    def _prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], W: int, rows: int) -> Tensor:
        """Prefill n <= rows prompts as one (rows, W) window batch, rows past n all padding; logits (n, V) (with
        the split head: final hidden states (n, C))."""
        cfg, st, dev = self.config, self.state, self.device
        R, bs, n = cfg.receptive_field, cfg.block_size, len(prompts)
        idx = torch.zeros(rows, W, dtype=torch.long)  # (rows, W) left-padded last W tokens
        win = torch.zeros(n, R, dtype=torch.long)  # (n, R) last R tokens, for the sliding regime
        last_pos = torch.zeros(rows, dtype=torch.long)  # (rows,)
        valid = torch.zeros(rows, dtype=torch.long)  # (rows,) 0 on padding rows: fully masked
        for i, p in enumerate(prompts):
            tail = list(p[-W:])
            idx[i, W - len(tail) :] = torch.tensor(tail)
            tail_r = list(p[-R:])
            win[i, R - len(tail_r) :] = torch.tensor(tail_r)
            last_pos[i] = min(len(p), bs) - 1
            valid[i] = len(tail)
        self.tokens_prefilled += idx.numel()
        logits, hist = self._window_forward(to_device(idx, dev), to_device(last_pos, dev), to_device(valid, dev))
        s = st.index(list(slots))
        st.conv.index_copy_(1, s, hist[:, :n].to(st.conv.dtype))
        st.window.index_copy_(0, s, to_device(win, dev))
        st.pos.index_copy_(0, s, to_device(torch.tensor([len(p) for p in prompts]), dev))
        for slot, p in zip(slots, prompts, strict=True):
            st.lengths[slot] = len(p)
        return logits[:n].float()

    # -- decode ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """Feed tokens (B,) to slots (distinct, in order); returns next-token logits (B, V) float32."""
        st = self.state
        idx = np.asarray(slots, dtype=np.int64)  # (B,) host: no device sync anywhere on this path
        n = idx.shape[0]
        if len(set(idx.tolist())) != n:  # a set of ints: a few times cheaper than np.unique per step
            raise ValueError(f"a step needs distinct slots, got {list(slots)}")
        tokens = tokens.to(self.device)
        sliding = st.lengths[idx] >= self.config.block_size  # (B,) rows past block_size
        any_sliding = bool(sliding.any())
        # tune_threads timed the cached step only: a sliding row recomputes its R-token window, a (R, C) GEMM per row
        # (the batch sizes where all threads win), so a step with one runs on every thread
        self._use_threads(1 if n <= self.one_thread_rows and not any_sliding else self._threads)
        if not any_sliding:
            out = self._cached(idx, tokens)
        elif sliding.all():
            out = self._window(idx, tokens)
        else:
            out = torch.empty(n, self._width, device=self.device)
            for rows, run in ((~sliding, self._cached), (sliding, self._window)):
                r = to_device(torch.from_numpy(np.flatnonzero(rows)), self.device)
                out[r] = run(idx[rows], tokens[r])
        st.lengths[idx] += 1
        return self._head(out) if self._head else out

    def _window_forward(self, idx: Tensor, last_pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """GAM.window_forward, or window_hidden where the head runs after the runners (deterministic on CPU)."""
        return (self.model.window_hidden if self._head else self.model.window_forward)(idx, last_pos, valid)

    def cached_step(self, s: Tensor, tokens: Tensor) -> Tensor:
        """Static-shape step for slots s (B,) all before block_size: gather once, step, scatter once in place."""
        st, cfg = self.state, self.config
        pos = st.pos.index_select(0, s).clamp(max=cfg.block_size - 1)  # (B,) scratch may run past the table
        hist = st.conv.index_select(1, s)  # (L, B, K-1, C)
        logits = self._math(tokens, pos, hist)  # (B, V), split head: (B, C); hist updated in place
        st.conv.index_copy_(1, s, hist)
        st.window.index_copy_(0, s, torch.cat([st.window.index_select(0, s)[:, 1:], tokens.unsqueeze(1)], 1))
        st.pos.index_copy_(0, s, pos + 1)
        return logits

    def window_step(self, s: Tensor, tokens: Tensor) -> Tensor:
        """Static-shape step past block_size: recompute the R-token window at the last R positions."""
        st, cfg = self.state, self.config
        win = torch.cat([st.window.index_select(0, s)[:, 1:], tokens.unsqueeze(1)], 1)  # (B, R)
        B, R = win.shape
        last = torch.full((B,), cfg.block_size - 1, device=win.device)
        logits, _ = self._window_forward(win, last, torch.full((B,), R, device=win.device))  # (B, V) or (B, C)
        st.window.index_copy_(0, s, win)
        st.pos.index_copy_(0, s, st.pos.index_select(0, s) + 1)
        return logits
