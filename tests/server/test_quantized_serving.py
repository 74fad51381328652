"""Serving quantized weights: --quantize int8 on a live server (the HTTP API unchanged), and start-up errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.cli import main
from tests.server.conftest import MODEL_ID, LiveServer


def test_live_server_with_int8_weights(make_settings) -> None:
    with LiveServer(make_settings(quantize="int8", dtype="auto")) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        info = c.get("/info").json()
        assert info["quantization"] == "int8" and info["model_dtype"] == "torch.bfloat16"
        r = c.post("/generate", json={"inputs": "The history of", "parameters": {"max_new_tokens": 8, "details": True}})
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 8
        model = c.get("/v1/models").json()["data"][0]
        assert (model["id"], model["quantization"], model["dtype"]) == (MODEL_ID, "int8", "bfloat16")
        r = c.post(
            "/v1/completions", json={"model": MODEL_ID, "prompt": "The", "max_tokens": 4, "echo": True, "logprobs": 1}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
        metrics = c.get("/metrics").text
        assert 'quantization="int8"' in next(ln for ln in metrics.splitlines() if ln.startswith("gam_model_info{"))


def test_unquantized_server_says_so(make_settings) -> None:
    with LiveServer(make_settings()) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/info").json()["quantization"] == "none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "fp8", "--device", "cpu"], "fp8 needs a CUDA GPU"),
        (["--quantize", "int4"], "quantize"),
    ],
)
def test_bad_combinations_exit_at_start_up(
    checkpoint_dir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--model", str(checkpoint_dir), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_pre_quantized_checkpoint_with_float32_exits_at_start_up(
    checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gam_model.cli.quantize import main as quantize_main

    quantize_main([str(checkpoint_dir), str(tmp_path / "q")])
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "q"), "--device", "cpu", "--dtype", "float32"])
    assert e.value.code == 2 and "pre-quantized for bfloat16 activations" in capsys.readouterr().err


def test_flag_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from server.cli import parse

    assert parse(["--quantize", "int8", "--device", "cpu"]).resolved_dtype() == torch.bfloat16
    monkeypatch.setenv("GAM_QUANTIZE", "fp8")
    assert parse([]).quantize == "fp8"
    assert parse(["--quantize", "none", "--device", "cpu"]).resolved_dtype() == torch.float32
