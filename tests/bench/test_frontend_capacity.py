"""bench/frontend_capacity.py's stand-in core drives a real gam-serve frontend: what the benchmark measures is the
frontend's real work (every token detokenized and streamed, requests ending at their length)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench import frontend_capacity as fc
from bench.common import bundled_model_dir

BUNDLED = bundled_model_dir()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="needs the bundled model's tokenizer")


def test_a_frontend_streams_the_stand_in_cores_tokens(tmp_path: Path) -> None:
    assert BUNDLED is not None
    from tokenizers import Tokenizer

    eos = json.loads((BUNDLED / "config.json").read_text())["eos_token_id"]
    ids = fc.text_ids(BUNDLED / "tokenizer.json", eos)
    assert eos not in ids and len(ids) > 1000
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(" ".join(map(str, ids)))
    address = f"ipc://{tmp_path}/core"
    core = subprocess.Popen([sys.executable, fc.__file__, "--core", address, str(ids_file), "1"])
    try:
        fronts = fc.Frontends(Path(fc.__file__).resolve().parents[1], BUNDLED, address, core.pid, 1)
        try:
            body = {"model": "stand-in", "prompt": "The game", "max_tokens": 20, "stream": True}
            with httpx.stream("POST", fronts.url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
            # one request alone: the stand-in gave it the passage's tokens from the start, one per step
            assert "".join(e["choices"][0]["text"] for e in events) == Tokenizer.from_file(
                str(BUNDLED / "tokenizer.json")
            ).decode(ids[:20])
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            with fc.HealthProbe(fronts.url) as probe:  # until a probe has answered (bounded: 30 s)
                for _ in range(600):
                    if probe.times:
                        break
                    probe.stop.wait(0.05)
            assert 0 < probe.quantile(0.5) <= probe.quantile(1.0)
        finally:
            fronts.close()
        # a worker drains at SIGTERM and exits 0 once the (stand-in) core says Drained: not killed at close's timeout
        assert [pr.returncode for pr in fronts.procs] == [0]
    finally:
        core.kill()
        core.wait()


def test_a_short_run_writes_its_medians(tmp_path: Path) -> None:
    """The JSON bench/host.py reads (its `mock` part): per label, the medians of the runs."""
    out = tmp_path / "capacity.json"
    root = Path(fc.__file__).resolve().parents[1]
    argv = [f"one={root}", "--streams", "4", "--tokens", "8", "--seconds", "1", "--reps", "1", "--json", str(out)]
    assert fc.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["streams"] == 4 and len(res["runs"]["one"]) == 1
    one = res["medians"]["one"]
    assert one["tok_s"] > 0 and one["frontend"] > 0 and one["client"] > 0
    assert one["frontend"] >= one["frontend_kernel"] >= 0


def test_health_probe_quantiles() -> None:
    probe = fc.HealthProbe("http://127.0.0.1:1")
    assert probe.quantile(0.5) != probe.quantile(0.5)  # nan: no probe was made
    probe.times = [5.0, 1.0, 3.0, 2.0]
    assert (probe.quantile(0.0), probe.quantile(0.5), probe.quantile(1.0)) == (1.0, 3.0, 5.0)
