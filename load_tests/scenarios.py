"""Named load presets; every field can be overridden on the command line."""

from __future__ import annotations

from typing import Any

# rate given as "Nx" means N times the capacity measured by a short closed-loop calibration run first
SCENARIOS: dict[str, dict[str, Any]] = {
    # a few requests to check that the server streams at all
    "smoke": dict(mode="closed", concurrency=2, num_requests=8, duration_s=30, input_words=32, output_tokens=16),
    # Poisson arrivals at half the measured capacity: latency in normal operation
    "steady": dict(
        mode="open",
        rate="0.5x",
        burstiness=1.0,
        concurrency=0,
        num_requests=200,
        duration_s=120,
        input_words=128,
        output_tokens=64,
    ),
    # bursty gamma arrivals at 4x capacity: the queue fills, the server must shed load with 429 and stay up
    "burst": dict(
        mode="open",
        rate="4x",
        burstiness=0.5,
        concurrency=0,
        num_requests=400,
        duration_s=60,
        input_words=128,
        output_tokens=64,
    ),
    # long closed loop where a share of clients hang up mid-stream: slots must be freed, memory must stay flat
    "soak": dict(
        mode="closed",
        concurrency=32,
        num_requests=20000,
        duration_s=600,
        input_words=128,
        output_tokens=128,
        disconnect_fraction=0.2,
    ),
    # issue #7 (run with `python -m load_tests.soak`, which also checks the server): 10,000 short requests at 32
    # streams, 10% cut mid-stream -> 0 leaked slots, 0 x 5xx, RSS growth < 5%
    "reliability": dict(
        mode="closed",
        concurrency=32,
        num_requests=10_000,
        duration_s=3600,
        input_words=32,
        output_tokens=16,
        disconnect_fraction=0.1,
        disconnect_within=15,
    ),
}
