"""Prometheus metrics (prefix `gam_`): the engine core's plain stats mapped onto one registry, in the core process.

The frontend's /metrics asks the core for this registry's exposition (server/engine.py) and appends its own process
metrics (`gam_frontend_process_*`).
"""

from __future__ import annotations

import bisect
import collections
import functools
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.core import EngineCore, RequestStats, StepStats

# engine finish reasons (TGI names) -> the label values dashboards alert on
FINISH_LABELS = {
    "length": "length",
    "stop_sequence": "stop",
    "eos_token": "eos",
    "cancelled": "cancelled",
    "error": "error",
    "rejected": "rejected",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TPS_WINDOW_S = 10.0


class FrontendProcessCollector(Collector):
    """The answering frontend process's own CPU and memory (`gam_frontend_process_*{frontend="i"}`), appended to the
    core's exposition by /metrics. The label keeps N frontends' counters apart: a scrape lands on any of them."""

    def __init__(self, frontend: int) -> None:
        self.frontend = str(frontend)
        self.inner = ProcessCollector(namespace="gam_frontend", registry=None)

    def collect(self) -> Iterator[Metric]:
        for fam in self.inner.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for smp in fam.samples:
                out.add_sample(smp.name, {**smp.labels, "frontend": self.frontend}, smp.value, smp.timestamp)
            yield out


@functools.cache
def frontend_registry(frontend: int) -> CollectorRegistry:
    """This process's registry of its own metrics as frontend `frontend`."""
    r = CollectorRegistry()
    r.register(FrontendProcessCollector(frontend))
    return r


class CountedHistogram(Collector):
    """A histogram that takes n equal observations in one call: every running row of a step has the same
    inter-token latency, so a step observes it once with its row count instead of once per token."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, n: int = 1) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += n
            self.sum += value * n

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, acc = [], 0
        for bound, c in zip(self.bounds, counts, strict=True):
            acc += c
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)


class Metrics:
    """All gam_* metrics in a registry of their own; `observe_step` / `observe_request` are the engine's hooks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.request_duration = Histogram(
            "gam_request_duration_seconds",
            "End-to-end request latency, arrival to last event",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "gam_request_queue_duration_seconds",
            "Time from arrival to admission into the running batch",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gam_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = CountedHistogram(
            "gam_time_per_output_token_seconds",
            "Inter-token latency (time between two generated tokens of one request)",
            ITL_BUCKETS,
            r,
        )
        self.busy = Counter(
            "gam_engine_busy_seconds",
            "Wall time of the engine core's busy iterations: forward calls, the sampling call, and the host work "
            "around them (scheduling, finish checks, stats, output)",
            ["part"],
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "gam_request_prompt_tokens", "Prompt length in tokens per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.generated_tokens = Histogram(
            "gam_request_generated_tokens", "Generated tokens per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "gam_batch_size",
            "Sequences sampled per engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.step_duration = Histogram(
            "gam_step_duration_seconds",
            "Wall time of one engine step (prefill + decode + sampling)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "gam_requests", "Finished requests by endpoint and finish reason", ["endpoint", "finish_reason"], registry=r
        )
        self.failures = Counter(
            "gam_request_failures",
            "API calls answered with an error (HTTP status >= 400, or an error event ending the stream), by endpoint "
            "and TGI error_type",
            ["endpoint", "error_type"],
            registry=r,
        )
        self.prompt_tokens_total = Counter("gam_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens_total = Counter("gam_generated_tokens", "Generated tokens", registry=r)
        self.scored_tokens_total = Counter(
            "gam_prompt_logprob_tokens",
            "Prompt tokens scored for prompt logprobs (decoder_input_details, echo + logprobs): O(prompt) work",
            registry=r,
        )
        self.running = Gauge("gam_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("gam_requests_waiting", "Requests waiting for a slot", registry=r)
        self.tokens_per_second = Gauge(
            "gam_generated_tokens_per_second",
            f"Generated tokens per second over the last {TPS_WINDOW_S:.0f}s",
            registry=r,
        )
        self.model_info = Gauge(
            "gam_model_info",
            "The served model",
            ["model", "dtype", "device", "version", "quantization"],
            registry=r,
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc; nothing elsewhere): soak runs
        # read RSS growth from here, as operators do from any Prometheus client
        ProcessCollector(registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._tokens_per_second)

    def bind(
        self, engine: EngineCore, model: str, dtype: str, device: str, version: str, quantization: str = "none"
    ) -> None:
        """Hook the engine core's stats callbacks and live gauges to these metrics."""
        engine.on_step = self.observe_step
        engine.on_request = self.observe_request
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.model_info.labels(model=model, dtype=dtype, device=device, version=version, quantization=quantization).set(
            1
        )

    def observe_step(self, s: StepStats) -> None:
        self.scored_tokens_total.inc(s.scored_tokens)
        if not s.batch_size:  # an iteration that only scored prompts is not a decode step
            return
        self.batch_size.observe(s.batch_size)
        self.step_duration.observe(s.duration_s)
        self.generated_tokens_total.inc(s.generated_tokens)
        if s.itl_rows:
            self.itl.observe(s.itl_s, s.itl_rows)
        self.busy.labels(part="forward").inc(s.forward_s)
        self.busy.labels(part="sample").inc(s.sample_s)
        self.busy.labels(part="host").inc(max(0.0, s.duration_s - s.forward_s - s.sample_s))
        with self._lock:
            self._window.append((time.monotonic(), s.generated_tokens))

    def observe_request(self, s: RequestStats) -> None:
        self.requests.labels(endpoint=s.endpoint, finish_reason=FINISH_LABELS.get(s.finish_reason, "error")).inc()
        self.request_duration.observe(s.duration_s)
        if s.queue_s is not None:
            self.queue_duration.observe(s.queue_s)
            self.prompt_tokens.observe(s.prompt_tokens)
            self.prompt_tokens_total.inc(s.prompt_tokens)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        self.generated_tokens.observe(s.generated_tokens)

    def count_failure(self, endpoint: str, error_type: str) -> None:
        """An API call answered with an error (an HTTP status >= 400, or an error event ending its stream)."""
        self.failures.labels(endpoint=endpoint, error_type=error_type).inc()

    def count_rejected(self, endpoint: str, sequences: int) -> None:
        """A call refused before reaching the engine (queue full, draining): its sequences, as other outcomes count."""
        self.requests.labels(endpoint=endpoint, finish_reason="rejected").inc(sequences)

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - TPS_WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / TPS_WINDOW_S
