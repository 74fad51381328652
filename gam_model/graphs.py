"""Static-shape step runners per batch-size bucket: eager, CUDA graphs, and a CPU stand-in for the graph.

A step function `fn(slots (b,), tokens (b,)) -> logits (b, V)` reads and writes the slot pool in place. The
runner pads a live batch of n rows up to its bucket b with the scratch slot, so `fn` only ever sees a few
static shapes. With graphs, each bucket owns static input buffers (slot ids, tokens) and the output of its
captured graph: a step copies in, replays, and copies out (mamba_ssm `cg=True`, vLLM capture sizes). The
CPU stand-in (`ReplayGraph`) "replays" by calling the captured callable on the same static buffers, so the
bookkeeping that CUDA runs is the code path the CPU tests cover.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from gam_model.device import to_device

if TYPE_CHECKING:  # torch.cuda.graph_pool_handle()'s type; torch imports it the same way
    from torch.cuda import _POOL_HANDLE

StepFn = Callable[[Tensor, Tensor], Tensor]


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch-size buckets 1, 2, 4, ... up to max_batch (inclusive)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def pad_to(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


class Graph(Protocol):
    """A captured computation: `capture(fn)` records fn and returns its (static) output; `replay()` reruns it."""

    def capture(self, fn: Callable[[], Tensor]) -> Tensor: ...

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph: warm up on a side stream, then capture into a memory pool shared by all buckets."""

    def __init__(self, pool: _POOL_HANDLE | None, warmup: int = 3) -> None:
        self.pool = pool
        self.warmup = warmup
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Tensor]) -> Tensor:
        # Warm-up outside the capture (lazy init, cuBLAS workspaces, Triton/inductor compilation) on a side
        # stream, as https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs prescribes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: CUDA calls the server's other threads may make do not invalidate this capture
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class ReplayGraph:
    """CPU stand-in for CudaGraph: 'capture' runs fn once; 'replay' reruns it into the same output buffer."""

    def __init__(self) -> None:
        self.fn: Callable[[], Tensor] | None = None
        self.out: Tensor | None = None

    def capture(self, fn: Callable[[], Tensor]) -> Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        assert self.fn is not None and self.out is not None, "replay before capture"
        self.out.copy_(self.fn())


class CapturedBucket:
    """One bucket's static buffers (slot ids, tokens) and the graph that maps them to static logits."""

    def __init__(self, fn: StepFn, size: int, scratch: int, device: torch.device, graph: Graph) -> None:
        self.size = size
        # Capture with every row on the scratch slot: warm-up runs touch no real slot's state.
        self.slots = torch.full((size,), scratch, dtype=torch.long, device=device)  # (b,)
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)  # (b,)
        # On CUDA the slot ids go through a pinned host buffer: a pageable copy would block the host until the
        # stream drains. The event keeps the host from rewriting the buffer before its copy has run.
        cuda = device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.long, pin_memory=cuda)  # (b,)
        self.copied = torch.cuda.Event() if cuda else None
        self.graph = graph
        self.out = graph.capture(lambda: fn(self.slots, self.tokens))  # (b, V)

    def run(self, slots: np.ndarray, tokens: Tensor) -> Tensor:
        """slots (b,) padded slot ids (host), tokens (n,) -> logits (n, V) float32, a fresh tensor."""
        n = tokens.shape[0]
        if self.copied is not None:
            self.copied.synchronize()
        self.host.numpy()[:] = slots
        self.slots.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.tokens[:n].copy_(tokens)
        self.tokens[n:].zero_()
        self.graph.replay()
        return self.out[:n].to(torch.float32, copy=True)  # copy: the next replay overwrites self.out


class BucketedStep:
    """Runs a static-shape step at the bucket of each batch: eagerly, or by replaying one graph per bucket.

    graphs: None (eager), "cuda" (torch.cuda.CUDAGraph, one shared memory pool) or "replay" (CPU stand-in).
    Buckets are captured on first use, or all at once by `capture_all()` (largest first, as vLLM does, so
    the shared pool is sized by the largest graph).
    """

    def __init__(
        self,
        fn: StepFn,
        buckets: Sequence[int],
        scratch: int,
        device: torch.device,
        graphs: str | None = None,
        pool: _POOL_HANDLE | None = None,
    ) -> None:
        if graphs not in (None, "cuda", "replay"):
            raise ValueError(f"graphs must be None, 'cuda' or 'replay', got {graphs!r}")
        self.fn = fn
        self.buckets = list(buckets)
        self.scratch = scratch
        self.device = device
        self.graphs = graphs
        self.pool = pool
        self.captured: dict[int, CapturedBucket] = {}

    def _new_graph(self) -> Graph:
        return CudaGraph(self.pool) if self.graphs == "cuda" else ReplayGraph()

    def bucket(self, size: int) -> CapturedBucket:
        """The captured bucket of this size, capturing it now if needed."""
        if size not in self.captured:
            self.captured[size] = CapturedBucket(self.fn, size, self.scratch, self.device, self._new_graph())
        return self.captured[size]

    def capture_all(self) -> None:
        if self.graphs is not None:
            for b in sorted(self.buckets, reverse=True):
                self.bucket(b)

    def __call__(self, slots: Sequence[int] | np.ndarray, tokens: Tensor) -> Tensor:
        """Step `slots` (n distinct real slots) with tokens (n,) -> logits (n, V) float32.

        A batch larger than the largest bucket runs in chunks of that bucket (the last one padded).
        """
        n, top = len(slots), self.buckets[-1]
        if n > top:
            return torch.cat([self(slots[i : i + top], tokens[i : i + top]) for i in range(0, n, top)])
        b = pad_to(n, self.buckets)
        padded = np.full(b, self.scratch, dtype=np.int64)  # (b,) host
        padded[:n] = slots
        if self.graphs is not None:
            return self.bucket(b).run(padded, tokens)
        t = tokens if b == n else torch.cat([tokens, tokens.new_zeros(b - n)])  # (b,)
        return self.fn(to_device(torch.from_numpy(padded), self.device), t)[:n].float()
