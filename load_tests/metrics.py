"""Per-request timing records and the serving statistics computed from them (vLLM benchmark_serving definitions).

Definitions follow vLLM's `benchmarks/benchmark_serving.py` (`calculate_metrics`), so figures compare:
- TTFT: time from sending the request to the first token event.
- ITL: every gap between consecutive token events, pooled over all successful requests.
- TPOT: per request, (e2e - ttft) / (output_tokens - 1), only for requests with more than one output token.
- E2EL: time from sending the request to the end of its stream.
- throughput: completed requests (or their output tokens) divided by the benchmark's wall time.
- goodput: completed requests per second that meet every given SLO (TPOT counts as 0 for a 1-token output).
Failed and deliberately disconnected requests are excluded from the latency statistics and counted apart.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds on one monotonic clock (time.perf_counter)."""

    start: float
    prompt_words: int = 0
    max_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # arrival time of each token event
    end: float | None = None  # when the stream finished (final event / [DONE] / disconnect / error)
    status: int | None = None  # HTTP status, None if no response arrived
    error: str | None = None  # None on success; else e.g. "http_429", "stream:overloaded", "ReadTimeout"
    disconnected: bool = False  # the client cut the stream on purpose (--disconnect-fraction)
    output_tokens: int | None = None  # as the server reported (usage / details); None: count token events
    prompt_tokens: int | None = None  # as the server reported, if it did
    text: str = ""

    @property
    def success(self) -> bool:
        return self.error is None and not self.disconnected and self.end is not None

    @property
    def n_output(self) -> int:
        """Output tokens: the server's count when it gave one, else the token events received."""
        return self.output_tokens if self.output_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2el(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); None for outputs of one token or less."""
        n, ttft, e2el = self.n_output, self.ttft, self.e2el
        if n <= 1 or ttft is None or e2el is None:
            return None
        return (e2el - ttft) / (n - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        return d


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """Parse vLLM-style SLOs 'ttft:500 tpot:50 e2el:2000' (milliseconds) into {key: seconds}."""
    out: dict[str, float] = {}
    for spec in specs or []:
        key, sep, val = spec.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"invalid SLO {spec!r}: expected one of {', '.join(SLO_KEYS)} as KEY:MILLISECONDS")
        ms = float(val)
        if ms <= 0:
            raise ValueError(f"SLO {key} must be positive, got {val}")
        out[key] = ms / 1000.0
    return out


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean / median / std / requested percentiles in milliseconds (0 when empty, as vLLM reports)."""
    a = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    out = {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "std_ms": float(a.std())}
    for p in percentiles:
        out[f"p{p:g}_ms"] = float(np.percentile(a, p))
    out["count"] = len(values_s)
    return out


def error_kinds(records: list[RequestRecord]) -> dict[str, int]:
    """Failed requests by kind (HTTP status or transport/stream error)."""
    return dict(Counter(r.error for r in records if r.error is not None))


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (50, 90, 99),
    slos: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Aggregate records over a benchmark that lasted duration_s seconds (wall time)."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    ok = [r for r in records if r.success]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl]
    e2els = [r.e2el for r in ok if r.e2el is not None]
    out_tokens = sum(r.n_output for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = 0
    if slos:
        for r in ok:
            measured = {"ttft": r.ttft or 0.0, "tpot": r.tpot or 0.0, "e2el": r.e2el or 0.0}
            good += all(measured[k] <= v for k, v in slos.items())
    dis = [r for r in records if r.disconnected]
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": sum(r.error is not None for r in records),
        "disconnected": len(dis),
        "errors": error_kinds(records),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "disconnected_tokens_received": sum(len(r.token_times) for r in dis),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "request_goodput": good / duration_s if slos else None,
        "slos_s": dict(slos or {}),
    }
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        summary[name] = _stats(vals, list(percentiles))
    return summary


def timeline(records: list[RequestRecord], t0: float, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens/s, completed requests/s and requests in flight per time bin since t0."""
    ends = [r.end for r in records if r.end is not None]
    last = max([*ends, *(t for r in records for t in r.token_times[-1:])], default=t0)
    n = max(1, int(np.ceil((last - t0) / bin_s)))
    tokens = np.zeros(n)
    done = np.zeros(n)
    inflight = np.zeros(n)
    for r in records:
        for t in r.token_times:
            tokens[min(n - 1, int((t - t0) / bin_s))] += 1
        if r.success and r.end is not None:
            done[min(n - 1, int((r.end - t0) / bin_s))] += 1
        a = int((r.start - t0) / bin_s)
        b = int(((r.end if r.end is not None else last) - t0) / bin_s)
        inflight[a : min(n - 1, b) + 1] += 1
    return {
        "t_s": [(i + 0.5) * bin_s for i in range(n)],
        "output_tokens_per_s": list(tokens / bin_s),
        "completed_per_s": list(done / bin_s),
        "in_flight": list(inflight),
    }
