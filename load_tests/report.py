"""Results out: JSON document, terminal table (vLLM's layout) and a PNG of latency CDFs and throughput over time."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.metrics import METRICS, RequestRecord, summarize, timeline
from load_tests.runner import RunResult

LABELS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def machine() -> dict[str, Any]:
    """The client machine, for the record."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}


def document(
    result: RunResult,
    percentiles: list[float],
    slos: dict[str, float],
    extra: dict | None = None,
    with_requests: bool = True,
) -> dict[str, Any]:
    """The JSON result: config, machine, summary, timeline and (optionally) every request."""
    cfg = asdict(result.config)
    cfg["prompts"] = str(cfg["prompts"])
    cfg.pop("api_key", None)
    doc: dict[str, Any] = {
        "config": cfg,
        "machine": machine(),
        "summary": summarize(result.records, result.duration_s, percentiles, slos),
        "timeline": timeline(result.records, result.t0),
    }
    if extra:
        doc.update(extra)
    if with_requests:
        t0 = result.t0
        doc["requests"] = [_relative(r.to_dict(), t0) for r in result.records]
    return doc


def _relative(d: dict[str, Any], t0: float) -> dict[str, Any]:
    d["start"] -= t0
    if d["end"] is not None:
        d["end"] -= t0
    d["token_times"] = [round(t - t0, 6) for t in d["token_times"]]
    return d


def table(summary: dict[str, Any]) -> str:
    """vLLM-style result table."""
    w = 44
    lines = ["{:=^56}".format(" Serving Benchmark Result ")]

    def row(k: str, v: Any) -> None:
        lines.append(f"{k:<{w}} {v:>11.2f}" if isinstance(v, float) else f"{k:<{w}} {v!s:>11}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    if summary["errors"]:
        row("  errors:", ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())))
    row("Disconnected on purpose:", summary["disconnected"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens (server-reported):", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary["request_goodput"] is not None:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for m in METRICS:
        s = summary[m]
        lines.append(f"{LABELS[m]:-^56}")
        for k, v in s.items():
            if k.endswith("_ms") and k not in ("std_ms", "p50_ms"):  # p50 is the median row
                row(f"{k[:-3].capitalize()} {m.upper()} (ms):", v)
    lines.append("=" * 56)
    return "\n".join(lines)


def plot(records: list[RequestRecord], doc: dict[str, Any], path: Path) -> None:
    """Latency CDFs (log x) and output tokens/s + requests in flight over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [t for t in (r.tpot for r in ok) if t is not None],
        "ITL": [g for r in ok for g in r.itl],
        "E2E": [r.e2el for r in ok if r.e2el is not None],
    }
    for name, vals in series.items():
        if vals:
            v = np.sort(np.maximum(np.asarray(vals) * 1000.0, 1e-3))
            ax1.plot(v, np.arange(1, len(v) + 1) / len(v), label=f"{name} (n={len(v)})")
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction of requests / gaps")
    ax1.set_title("latency CDFs (successful requests)")
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.lines:
        ax1.legend()
    tl = doc["timeline"]
    ax2.plot(tl["t_s"], tl["output_tokens_per_s"], color="C0", label="output tokens/s")
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("output tokens/s", color="C0")
    ax3 = ax2.twinx()
    ax3.plot(tl["t_s"], tl["in_flight"], color="C1", label="requests in flight")
    ax3.set_ylabel("requests in flight", color="C1")
    s = doc["summary"]
    ax2.set_title(f"throughput: {s['output_throughput']:.0f} tok/s, {s['request_throughput']:.2f} req/s")
    c = doc["config"]
    fig.suptitle(f"{c['mode']} loop, {c['api']}, {s['requests']} requests, errors {s['failed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: RunResult, doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write OUT.json and OUT.png; returns both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js, png = out.with_suffix(".json"), out.with_suffix(".png")
    js.write_text(json.dumps(doc, indent=1) + "\n")
    plot(result.records, doc, png)
    return js, png
