"""Statistics on synthetic records with known timestamps, against vLLM benchmark_serving's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from load_tests.metrics import RequestRecord, parse_goodput, summarize, timeline


def rec(start: float, times: list[float], end: float | None = None, **kw) -> RequestRecord:
    r = RequestRecord(start=start, token_times=list(times), end=end if end is not None else times[-1], **kw)
    r.status = 200 if r.error is None else r.status
    return r


def test_per_request_definitions() -> None:
    r = rec(10.0, [10.5, 10.6, 10.8, 11.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    # the server's token count wins over the number of events (several tokens may share one event)
    r2 = rec(0.0, [1.0, 2.0], output_tokens=5)
    assert r2.n_output == 5 and r2.tpot == pytest.approx(1.0 / 4)
    assert rec(0.0, [0.3]).tpot is None  # one token: no TPOT


def test_summary_matches_hand_computed_figures() -> None:
    ok = [rec(0.0, [0.2, 0.3, 0.4]), rec(1.0, [1.4, 1.6, 1.8, 2.0]), rec(2.0, [2.1])]
    bad = [
        rec(0.5, [], end=0.6, error="http_429", status=429),
        rec(0.5, [], end=0.7, error="http_429", status=429),
        rec(0.0, [0.5], end=3.0, error="stream:error"),
    ]
    cut = [rec(0.0, [0.5, 0.6], disconnected=True)]
    s = summarize(ok + bad + cut, duration_s=4.0, percentiles=[50, 90, 99])
    assert (s["requests"], s["completed"], s["failed"], s["disconnected"]) == (7, 3, 3, 1)
    assert s["errors"] == {"http_429": 2, "stream:error": 1}
    assert s["total_output_tokens"] == 3 + 4 + 1
    assert s["disconnected_tokens_received"] == 2
    assert s["request_throughput"] == pytest.approx(3 / 4.0)
    assert s["output_throughput"] == pytest.approx(8 / 4.0)
    ttfts = [0.2, 0.4, 0.1]
    assert s["ttft"]["mean_ms"] == pytest.approx(np.mean(ttfts) * 1000)
    assert s["ttft"]["median_ms"] == pytest.approx(200.0)
    assert s["ttft"]["p90_ms"] == pytest.approx(np.percentile(ttfts, 90) * 1000)
    itls = [0.1, 0.1, 0.2, 0.2, 0.2]  # pooled over requests
    assert s["itl"]["count"] == 5
    assert s["itl"]["mean_ms"] == pytest.approx(np.mean(itls) * 1000)
    assert s["itl"]["p99_ms"] == pytest.approx(np.percentile(itls, 99) * 1000)
    tpots = [(0.4 - 0.2) / 2, (1.0 - 0.4) / 3]  # the 1-token request has none
    assert s["tpot"]["count"] == 2
    assert s["tpot"]["mean_ms"] == pytest.approx(np.mean(tpots) * 1000)
    assert s["e2el"]["median_ms"] == pytest.approx(400.0)
    assert s["request_goodput"] is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    ok = [rec(0.0, [0.2, 0.3, 0.4]), rec(1.0, [1.4, 1.6, 1.8, 2.0]), rec(2.0, [2.1])]
    # TTFT <= 300 ms keeps requests 1 and 3; TPOT <= 150 ms keeps 1 and 3 (a 1-token output counts as TPOT 0)
    s = summarize(ok, 2.0, slos=parse_goodput(["ttft:300", "tpot:150"]))
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    s = summarize(ok, 2.0, slos=parse_goodput(["e2el:1000"]))
    assert s["request_goodput"] == pytest.approx(3 / 2.0)
    s = summarize(ok, 2.0, slos=parse_goodput(["ttft:50"]))
    assert s["request_goodput"] == 0.0


@pytest.mark.parametrize("spec", ["ttft", "itl:10", "tpot:-1", "e2el:x"])
def test_bad_slo_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_goodput([spec])


def test_empty_run_reports_zeros_not_nan() -> None:
    s = summarize([rec(0.0, [], end=0.1, error="ConnectError")], 1.0)
    assert s["completed"] == 0 and s["ttft"]["mean_ms"] == 0.0 and s["ttft"]["count"] == 0


def test_timeline_bins_tokens_and_in_flight() -> None:
    rs = [rec(0.0, [0.5, 1.5, 1.6]), rec(1.2, [2.5], end=2.6)]
    tl = timeline(rs, t0=0.0, bin_s=1.0)
    assert tl["output_tokens_per_s"] == [1.0, 2.0, 1.0]
    assert tl["completed_per_s"] == [0.0, 1.0, 1.0]
    assert tl["in_flight"] == [1.0, 2.0, 1.0]
