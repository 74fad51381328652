"""Security: safetensors-only serving (pickles never run), constant-time API key check, body limit, no prompt in the
logs by default, and no request can pick a model path (the served name only; else 404 in OpenAI's shape)."""

from __future__ import annotations

import ast
import hmac
import logging
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from gam_model.checkpoint import CheckpointError, load_checkpoint
from gam_model.importer import load_reference_state_dict
from tests.server.conftest import LiveServer, app_client

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-gam"


class _Payload:
    """Unpickling this runs `Path(marker).touch()`: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(path: Path, marker: Path) -> None:
    torch.save({"token_embedding.weight": torch.zeros(4, 2), "evil": _Payload(marker)}, path)


def test_malicious_pickle_is_refused_by_the_importer(tmp_path: Path) -> None:
    marker, pt = tmp_path / "pwned", tmp_path / "ref.pt"
    _evil_pickle(pt, marker)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_reference_state_dict(pt)
    assert not marker.exists()


def test_serving_loads_safetensors_only(checkpoint_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # a checkpoint that only has a pickle: refused with a hint, the pickle never opened
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(checkpoint_dir / name, only_pickle / name)
    _evil_pickle(only_pickle / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pickles are never loaded"):
        load_checkpoint(only_pickle)
    # a pickle renamed to model.safetensors: the safetensors parser rejects it, nothing is unpickled
    disguised = tmp_path / "disguised"
    shutil.copytree(only_pickle, disguised)
    (disguised / "pytorch_model.bin").rename(disguised / "model.safetensors")
    with pytest.raises(Exception) as exc:  # safetensors' own error type
        load_checkpoint(disguised)
    assert "safetensor" in type(exc.value).__name__.lower() or "header" in str(exc.value).lower(), exc.value
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, has weights_only=True) of every torch.load(...) call in a source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            ok = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords
            )
            out.append((node.lineno, ok))
    return out


def test_every_torch_load_uses_weights_only() -> None:
    """No code path of the model package or the server unpickles with weights_only=False (or the default)."""
    calls = {
        str(p.relative_to(ROOT)): c
        for pkg in ("gam_model", "server")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if (c := _torch_load_calls(p))
    }
    assert calls, "expected at least the importer's torch.load"
    bad = {f: [line for line, ok in c if not ok] for f, c in calls.items() if not all(ok for _, ok in c)}
    assert not bad, f"torch.load without weights_only=True: {bad}"
    assert not [p for pkg in ("server",) for p in (ROOT / pkg).rglob("*.py") if "pickle" in p.read_text()]


async def test_api_key_is_compared_in_constant_time(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every presented key, right or wrong, of any length, goes through hmac.compare_digest (no early-exit ==)."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("server.auth.hmac.compare_digest", spy)
    key = "k3y-0123456789abcdef"
    async with app_client(make_settings(api_key=key)) as (_, client):
        presented = ["x", "k3y-0123456789abcdeX", key[:-1], key + "0", key]
        for token in presented:
            r = await client.get("/info", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == (200 if token == key else 401), token
        assert [a for a, _ in seen] == [t.encode() for t in presented]
        assert all(b == key.encode() for _, b in seen)
        # the key never leaks into answers or the schema
        r = await client.get("/openapi.json", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and key not in r.text
        assert key not in (await client.get("/info", headers={"Authorization": f"Bearer {key}"})).text
        assert key not in (await client.get("/metrics")).text


def test_body_limit_on_a_real_server(make_settings) -> None:
    """A 4 MiB body to a 64 KiB limit gets 413 in the API's shape (by Content-Length and chunked); still healthy."""
    with LiveServer(make_settings(max_body_bytes=64 * 1024)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        big = b'{"inputs": "' + b"a" * (4 << 20) + b'"}'
        r = c.post("/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "validation"

        def chunks():
            for _ in range(64):
                yield b" " * 65536

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/health").status_code == 200
        assert s.engine.num_running == 0 and s.engine.free_slots == 4


async def test_prompts_are_not_logged_by_default(make_settings, caplog: pytest.LogCaptureFixture) -> None:
    """With the default settings, at DEBUG, no log record carries prompt text, even on errors."""
    secret = "zebra-quartz-4471"
    caplog.set_level(logging.DEBUG)
    async with app_client(make_settings(fault_injection="step:2")) as (_, client):
        ok = {"inputs": f"The {secret} game", "parameters": {"max_new_tokens": 1}}
        assert (await client.post("/generate", json=ok)).status_code == 200
        failing = {"inputs": f"My {secret} song", "parameters": {"max_new_tokens": 5}}
        assert (await client.post("/generate", json=failing)).status_code == 500  # step 2 fails: logged
        oa = {"model": MODEL, "prompt": f"A {secret}", "max_tokens": 2, "temperature": -1}
        assert (await client.post("/v1/completions", json=oa)).status_code == 400
    assert any(r.levelno >= logging.ERROR for r in caplog.records), "the injected failure should be logged"
    assert secret not in caplog.text


@pytest.mark.parametrize(
    "name",
    [
        "gpt-3.5-turbo-instruct",
        "",
        "/etc/passwd",
        "../tiny-gam",
        "./tiny-gam",
        "tiny-gam/",
        "TINY-GAM",
        "weights/tiny-gam",
        "file:///tmp/tiny-gam",
        "CHECKPOINT_DIR",  # replaced by the real checkpoint directory
    ],
)
async def test_request_cannot_choose_a_model_path(make_settings, checkpoint_dir: Path, name: str) -> None:
    name = str(checkpoint_dir) if name == "CHECKPOINT_DIR" else name
    async with app_client(make_settings()) as (app, client):
        r = await client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
        assert f"serves `{MODEL}`" in err["message"]  # names the served model, not the operator's path
        assert app.state.engine.num_running == 0


async def test_no_answer_reveals_or_takes_a_filesystem_path(make_settings, checkpoint_dir: Path) -> None:
    """TGI bodies have no model field (an extra one is ignored); no endpoint shows the operator's model path."""
    async with app_client(make_settings()) as (_, client):
        body = {"inputs": "x", "model": "/etc/passwd", "model_id": "/etc", "parameters": {"max_new_tokens": 1}}
        assert (await client.post("/generate", json=body)).status_code == 200
        for path in ("/info", "/v1/models", "/openapi.json", "/metrics"):
            r = await client.get(path)
            assert r.status_code == 200 and str(checkpoint_dir) not in r.text, path
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == MODEL
        spec = (await client.get("/openapi.json")).json()
        props = {p for s in spec["components"]["schemas"].values() for p in s.get("properties", {})}
        assert not props & {"model_path", "model_dir", "path", "checkpoint", "weights"}
