"""The load generator against a scripted SSE server with known sleeps (real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest

from load_tests import runner
from load_tests.cli import main
from load_tests.metrics import summarize
from load_tests.runner import LoadConfig, intervals, run_load

from .conftest import GAP_S, REJECT_EVERY, TTFT_S

N_TOKENS = 6
# Token i cannot arrive before TTFT_S + i * GAP_S: a hard lower bound. On a shared, busy CPU it may arrive any time
# later, so no test here bounds a time from above by a constant; upper bounds are other measurements of the same run
# (a request lies inside the run, a token inside its request). The statistics are checked exactly in test_metrics.py.


def expected_e2e() -> float:
    return TTFT_S + (N_TOKENS - 1) * GAP_S


@pytest.mark.parametrize("client", ["httpx", "raw"])
@pytest.mark.parametrize("api", ["tgi", "openai"])
async def test_closed_loop_timings_and_counts(scripted, api: str, client: str) -> None:
    url, script = scripted
    cfg = LoadConfig(
        url=url,
        api=api,
        client=client,
        extra_body={"logit_bias": {"7": -100}},
        mode="closed",
        concurrency=2,
        num_requests=6,
        output_tokens=N_TOKENS,
        input_words=20,
        model="scripted",
        duration_s=30,
    )
    res = await run_load(cfg, progress=False)
    assert len(res.records) == 6 and script.requests == 6
    for r in res.records:
        assert r.success and r.status == 200
        assert len(r.token_times) == N_TOKENS and r.n_output == N_TOKENS
        assert r.text == "".join(f" t{i}" for i in range(N_TOKENS))
        # token i cannot arrive before TTFT_S + i * GAP_S; it may arrive late, so single gaps can look short
        for i, t in enumerate(r.token_times):
            assert TTFT_S + i * GAP_S <= t - r.start <= r.e2el
        assert r.token_times == sorted(r.token_times)
        assert r.ttft == r.token_times[0] - r.start
        assert sum(r.itl) == pytest.approx(r.token_times[-1] - r.token_times[0])
        assert expected_e2e() <= r.e2el <= res.duration_s
        assert res.t0 <= r.start and r.start + r.e2el <= res.t1
    s = summarize(res.records, res.duration_s)
    assert s["completed"] == 6 and s["failed"] == 0 and s["total_output_tokens"] == 6 * N_TOKENS
    assert s["itl"]["count"] == 6 * (N_TOKENS - 1)
    assert s["tpot"]["median_ms"] / 1000 > 0 and s["itl"]["median_ms"] / 1000 > 0
    assert TTFT_S <= s["ttft"]["median_ms"] / 1000 <= max(r.ttft for r in res.records)
    # 3 rounds of 2 concurrent requests: the wall time is at least 3 end-to-end latencies
    assert 3 * expected_e2e() <= res.duration_s
    if api == "openai":
        assert all(r.prompt_tokens == 20 for r in res.records)  # from the usage chunk
        assert all(b["model"] == "scripted" and b["stream_options"]["include_usage"] for b in script.bodies)
    assert all(b["logit_bias"] == {"7": -100} for b in script.bodies)


@pytest.mark.parametrize("client", ["httpx", "raw"])
async def test_errors_are_counted_by_status(scripted, client: str) -> None:
    url, script = scripted
    script.reject = True
    cfg = LoadConfig(url=url, api="tgi", client=client, concurrency=2, num_requests=8, output_tokens=3, duration_s=30)
    res = await run_load(cfg, progress=False)
    s = summarize(res.records, res.duration_s)
    assert script.rejected == 8 // REJECT_EVERY
    assert s["errors"] == {"http_429": 8 // REJECT_EVERY}
    assert s["completed"] == 8 - 8 // REJECT_EVERY


@pytest.mark.parametrize("client", ["httpx", "raw"])
async def test_disconnects_cut_the_stream_and_the_server_sees_it(scripted, client: str) -> None:
    url, script = scripted
    cfg = LoadConfig(
        url=url,
        api="tgi",
        client=client,
        concurrency=4,
        num_requests=8,
        output_tokens=20,
        disconnect_within=5,  # the server has >= 15 gaps left to notice the closed socket
        disconnect_fraction=1.0,
        duration_s=30,
        seed=3,
    )
    res = await run_load(cfg, progress=False)
    assert all(r.disconnected and 1 <= len(r.token_times) <= 5 for r in res.records)
    deadline = time.monotonic() + 30  # the server notices each closed socket at its next send (GAP_S)
    while script.aborted < 8:
        assert time.monotonic() < deadline, f"the server saw {script.aborted} of 8 disconnects"
        await asyncio.sleep(GAP_S)
    assert script.aborted == 8 and script.completed == 0
    s = summarize(res.records, res.duration_s)
    assert s["disconnected"] == 8 and s["completed"] == 0 and s["failed"] == 0


async def test_open_loop_sends_at_the_rate(scripted) -> None:
    url, script = scripted
    assert script.requests == 0
    cfg = LoadConfig(
        url=url,
        api="tgi",
        mode="open",
        rate=20.0,
        burstiness=1.0,
        concurrency=0,
        num_requests=20,
        output_tokens=2,
        duration_s=30,
    )
    res = await run_load(cfg, progress=False)
    starts = sorted(r.start for r in res.records)
    assert len(starts) == 20 and script.requests == 20 and all(r.success for r in res.records)
    # Poisson arrivals at 20/s, seed 0: the last send is due at the sum of the drawn gaps (sleeps only overrun)
    it = intervals(20.0, 1.0, np.random.default_rng(0))
    due = sum(next(it) for _ in range(19))
    assert due <= starts[-1] - res.t0  # sleeps only overrun


async def test_bounded_by_duration(scripted) -> None:
    url, _ = scripted
    cfg = LoadConfig(
        url=url, api="tgi", concurrency=1, num_requests=1000, output_tokens=N_TOKENS, duration_s=0.5, drain_s=5
    )
    res = await run_load(cfg, progress=False)
    assert 1 <= len(res.records) <= 0.5 / expected_e2e() + 1  # each takes at least expected_e2e(), one at a time
    assert all(r.start - res.t0 < 0.5 for r in res.records)  # nothing starts after the duration


@pytest.mark.parametrize("client", ["httpx", "raw"])
async def test_drain_cancels_requests_still_running(scripted, client: str) -> None:
    url, _ = scripted
    cfg = LoadConfig(
        url=url,
        api="tgi",
        client=client,
        concurrency=2,
        num_requests=2,
        output_tokens=1000,
        duration_s=0.2,
        drain_s=0.3,
    )
    res = await run_load(cfg, progress=False)
    assert [r.error for r in res.records] == ["cancelled_at_deadline"] * 2
    assert all(len(r.token_times) < 1000 for r in res.records)


async def test_raw_client_records_a_refused_connection_and_refuses_https() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listened on (and no other process takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        cfg = LoadConfig(url=f"http://127.0.0.1:{port}", client="raw", concurrency=1, num_requests=1, duration_s=5)
        res = await run_load(cfg, progress=False)
    assert [r.error for r in res.records] == ["ConnectError"]  # as the httpx client names it
    with pytest.raises(ValueError, match="plain http"):
        await run_load(LoadConfig(url="https://127.0.0.1:1", client="raw", num_requests=1), progress=False)


def test_cli_writes_json_png_and_table(scripted, tmp_path, capsys) -> None:
    url, _ = scripted
    out = tmp_path / "run"
    rc = main(
        [
            "--url",
            url,
            "--api",
            "openai",
            "--scenario",
            "smoke",
            "--num-requests",
            "4",
            "--output-len",
            "4",
            "--goodput",
            "ttft:5000",
            "tpot:1000",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["config"]["model"] == "scripted"  # resolved from GET /v1/models
    assert doc["summary"]["completed"] == 4 and doc["summary"]["request_goodput"] > 0
    assert doc["health_before"] == doc["health_after"] == 200
    assert len(doc["requests"]) == 4 and doc["machine"]["cores"] >= 1
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Median TTFT (ms):" in capsys.readouterr().out


def test_cli_stops_when_the_server_cannot_be_reached(capsys) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listened on (and no other process takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main(["--url", f"http://127.0.0.1:{port}", "--no-progress"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_cli_refuses_remote_targets(capsys) -> None:
    assert main(["--url", "http://192.0.2.1:8000", "--no-progress"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_cli_burst_calibrates_then_runs_at_a_multiple(scripted, tmp_path) -> None:
    url, _ = scripted
    rc = main(
        [
            "--url",
            url,
            "--scenario",
            "burst",
            "--num-requests",
            "6",
            "--output-len",
            "2",
            "--duration",
            "5",
            "--calibrate-concurrency",
            "2",
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    cap = doc["calibration"]["capacity_req_per_s"]
    assert cap > 0 and doc["config"]["rate"] == pytest.approx(4 * cap)
    assert doc["config"]["burstiness"] == 0.5


def test_run_works_without_asyncio_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` (every load generator and bench entry point) works on Python 3.10, which the project supports
    (requires-python >= 3.10) and whose asyncio has no Runner, with uvloop installed (uvicorn[standard] brings it)."""
    monkeypatch.delattr(asyncio, "Runner")

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert runner.run(answer()) == 42


async def test_sleep_until_a_time_already_past_still_yields() -> None:
    """A late arrival (its time has passed: a burst, a busy loop) still lets the event loop run once, as the
    asyncio.sleep(0) it replaced did: the requests already created start and the streams being read get their
    chunks while the open loop catches up, not after the whole burst is created."""
    ran = asyncio.Event()

    async def other() -> None:
        ran.set()

    task = asyncio.create_task(other())
    await runner.sleep_until(time.perf_counter() - 1.0)
    assert ran.is_set()
    await task
    t = time.perf_counter() + 0.02
    await runner.sleep_until(t)
    assert time.perf_counter() >= t
