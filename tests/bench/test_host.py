"""The pure parts of bench/host.py: reading counters from /metrics text, splitting a process tree's CPU, medians."""

from __future__ import annotations

import subprocess

import pytest

from bench.host import ENGINE_CORE, counter_delta, cpu_split, cpu_used, medians, metric_sum, ratio

BEFORE = """\
# HELP gam_engine_busy_seconds_total Wall seconds of the engine core's busy iterations
# TYPE gam_engine_busy_seconds_total counter
gam_engine_busy_seconds_total{part="forward"} 2.0
gam_engine_busy_seconds_total{part="sample"} 0.5
gam_engine_busy_seconds_total{part="host"} 0.25
# HELP gam_generated_tokens_total Generated tokens
# TYPE gam_generated_tokens_total counter
gam_generated_tokens_total 1000.0
"""
AFTER = BEFORE.replace('"host"} 0.25', '"host"} 0.75').replace("tokens_total 1000.0", "tokens_total 101000.0")
TODAY = BEFORE[BEFORE.index("# HELP gam_generated") :]  # a server without the busy counter


def test_metric_sum_by_label_and_missing() -> None:
    assert metric_sum(BEFORE, "gam_engine_busy_seconds_total", part="sample") == 0.5
    assert metric_sum(BEFORE, "gam_engine_busy_seconds_total") == 2.75  # every part
    assert metric_sum(BEFORE, "gam_generated_tokens_total") == 1000.0
    assert metric_sum(TODAY, "gam_engine_busy_seconds_total", part="host") is None
    assert metric_sum(BEFORE, "gam_engine_busy_seconds_total", part="nope") is None


def test_counter_delta() -> None:
    assert counter_delta(BEFORE, AFTER, "gam_engine_busy_seconds_total", part="host") == pytest.approx(0.5)
    assert counter_delta(BEFORE, AFTER, "gam_engine_busy_seconds_total", part="forward") == 0.0
    assert counter_delta(BEFORE, AFTER, "gam_generated_tokens_total") == 100_000.0
    assert counter_delta("", AFTER, "gam_generated_tokens_total") == 101_000.0  # counter born in the window
    assert counter_delta(TODAY, TODAY, "gam_engine_busy_seconds_total", part="host") is None


def test_cpu_split_engine_core_and_frontends() -> None:
    before = {10: ("python", 5.0), 11: (ENGINE_CORE, 100.0), 12: ("python", 1.0)}
    after = {10: ("python", 6.5), 11: (ENGINE_CORE, 130.0), 13: ("python", 0.25)}  # 12 ended, 13 started
    used = cpu_used(before, after)
    assert used == {10: ("python", 1.5), 11: (ENGINE_CORE, 30.0), 13: ("python", 0.25)}
    core, frontend = cpu_split(used)
    assert core == 30.0
    assert frontend == 1.75  # 1.5 from pid 10, 0.25 from the new pid 13; what 12 used is not seen


def test_cpu_split_single_process() -> None:
    core, frontend = cpu_split(cpu_used({7: ("python", 2.0)}, {7: ("python", 3.0)}))
    assert core is None
    assert frontend == 1.0


def test_cpu_split_reused_pid_counts_from_zero() -> None:
    assert cpu_split(cpu_used({7: ("python", 9.0)}, {7: (ENGINE_CORE, 4.0)})) == (4.0, 0.0)


def test_ratio_and_medians() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None
    runs = [{"tok_s": 3.0, "host": None, "errors": {}}, {"tok_s": 1.0, "host": 5.0, "errors": {"x": 1}},
            {"tok_s": 2.0, "host": 7.0, "errors": {}}]  # fmt: skip
    assert medians(runs) == {"tok_s": 2.0, "host": 6.0}
    assert medians([{"host": None}]) == {"host": None}


def test_a_server_process_whose_start_fails_is_not_left_running(tmp_path, monkeypatch) -> None:
    """ServerProcess stops its gam-serve whatever ends the wait for it (an exception from finding its port, Ctrl-C),
    not only the failures it raises itself: a context manager's __exit__ does not run when __enter__ raises."""
    from bench import common

    started: list[subprocess.Popen] = []

    def fails(proc: subprocess.Popen, timeout: float) -> int:
        started.append(proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "SERVE", "import time; time.sleep(60)")  # a server that would run on
    monkeypatch.setattr(common, "listening_port", fails)
    try:
        with pytest.raises(KeyboardInterrupt), common.ServerProcess(tmp_path):
            pass
        [proc] = started
        assert proc.poll() is not None
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
