"""Malformed and out-of-range requests get a 4xx in their API's error shape; the server stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import app_client

MODEL = "tiny-gam"
TGI = "/generate"
OAI = "/v1/completions"


def tgi(params: dict | None = None, **kw) -> dict:
    return {"inputs": "The game", "parameters": {"max_new_tokens": 2, **(params or {})}, **kw}


def oai(**kw) -> dict:
    return {"model": MODEL, "prompt": "The game", "max_tokens": 2, **kw}


BAD_JSON = [
    # (path, body, expected status)
    (TGI, {}, 422),
    (TGI, {"inputs": ""}, 422),
    (TGI, {"inputs": 3}, 422),
    (TGI, {"inputs": None}, 422),
    (TGI, {"inputs": ["a", "b"]}, 422),
    (TGI, tgi({"temperature": -1.0}), 422),
    (TGI, tgi({"temperature": 0}), 422),
    (TGI, tgi({"temperature": "hot"}), 422),
    (TGI, tgi({"top_p": 0}), 422),
    (TGI, tgi({"top_p": 1.5}), 422),
    (TGI, tgi({"top_k": -3}), 422),
    (TGI, tgi({"typical_p": 2}), 422),
    (TGI, tgi({"repetition_penalty": 0}), 422),
    (TGI, tgi({"frequency_penalty": 5}), 422),
    (TGI, tgi({"max_new_tokens": 0}), 422),
    (TGI, tgi({"max_new_tokens": 100000}), 422),
    (TGI, tgi({"max_new_tokens": 2.5}), 422),
    (TGI, tgi({"max_new_tokens": True}), 422),
    (TGI, tgi({"seed": -1}), 422),
    (TGI, tgi({"seed": 2**64}), 422),
    (TGI, tgi({"stop": "x"}), 422),
    (TGI, tgi({"stop": ["a", "b", "c", "d", "e"]}), 422),
    (TGI, tgi({"stop": [""]}), 422),
    (TGI, tgi({"best_of": 2}), 422),
    (TGI, tgi({"watermark": True}), 422),
    (TGI, tgi({"grammar": {"type": "regex", "value": "a+"}}), 422),
    (TGI, tgi({"adapter_id": "lora"}), 422),
    (TGI, tgi({"top_n_tokens": 50}), 422),
    (TGI, tgi({"truncate": 0}), 422),
    (TGI, tgi({"truncate": 100000}), 422),
    (TGI, tgi({"details": "yes"}), 422),
    (TGI, {"inputs": "The game", "parameters": [1, 2]}, 422),
    (TGI, {"inputs": "word " * 400}, 422),  # over --max-input-tokens (256)
    (TGI, {"inputs": "\ud800 lone surrogate"}, 422),
    ("/generate_stream", tgi({"top_p": -1}), 422),
    ("/", tgi({"temperature": -2}, stream=True), 422),
    ("/", {"inputs": "x", "stream": "yes"}, 422),
    ("/tokenize", {"inputs": ""}, 422),
    (OAI, {"prompt": "x"}, 400),
    (OAI, oai(model="gpt-4"), 404),
    (OAI, oai(prompt=""), 400),
    (OAI, oai(prompt=[]), 400),
    (OAI, oai(prompt=[[]]), 400),
    (OAI, oai(prompt=[-1, 5]), 400),
    (OAI, oai(prompt=[10**9]), 400),
    (OAI, oai(prompt={"text": "x"}), 400),
    (OAI, oai(temperature=-0.5), 400),
    (OAI, oai(temperature=3), 400),
    (OAI, oai(top_p=0), 400),
    (OAI, oai(top_p=1.01), 400),
    (OAI, oai(max_tokens=0), 400),  # without echo
    (OAI, oai(max_tokens=-1, echo=True), 400),
    (OAI, oai(max_tokens=10**6), 400),
    (OAI, oai(n=0), 400),
    (OAI, oai(n=2, best_of=3), 400),
    (OAI, oai(logprobs=20), 400),
    (OAI, oai(presence_penalty=3), 400),
    (OAI, oai(frequency_penalty=-3), 400),
    (OAI, oai(stop=["a", "b", "c", "d", "e"]), 400),
    (OAI, oai(stream="true"), 400),
    (OAI, oai(stream_options={"include_usage": "yes"}), 400),
    (OAI, oai(stream_options={"include_usage": True}), 400),  # without stream (vLLM and OpenAI refuse it too)
    (OAI, oai(stream=False, stream_options={"include_usage": True}), 400),
    (OAI, oai(suffix="end"), 400),
    (OAI, oai(logit_bias={"x": 10}), 400),
    # keys Python's int() takes but that are not token ids: an Arabic-Indic 5, padding, a digit separator, a sign
    (OAI, oai(logit_bias={"\u0665": 10}), 400),
    (OAI, oai(logit_bias={" 5": 10}), 400),
    (OAI, oai(logit_bias={"5_0": 10}), 400),
    (OAI, oai(logit_bias={"+5": 10}), 400),
    (OAI, oai(logit_bias={"-1": 10}), 400),
    (OAI, oai(logit_bias={"99999": 10}), 400),
    (OAI, oai(logit_bias={"9" * 5000: 10}), 400),  # past int()'s 4,300 digits: its ValueError was a 500
    (OAI, oai(logit_bias={"0" * 5000: 10, "9": 1e9}), 400),  # token 0 (its bias out of range), in 5,000 digits
    (OAI, oai(logit_bias={"5": 101}), 400),
    (OAI, oai(logit_bias={"5": "ten"}), 400),
    (OAI, oai(logit_bias={"5": float("inf")}), 400),
    (OAI, oai(seed="12"), 400),
]


def check_shape(path: str, r: httpx.Response) -> None:
    body = r.json()
    if path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    else:
        assert set(body) == {"error", "error_type"} and body["error"], body


async def test_bad_json_bodies(make_settings) -> None:
    assert len(BAD_JSON) >= 25
    async with app_client(make_settings()) as (app, client):
        for path, body, status in BAD_JSON:
            r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == status, (path, body, r.status_code, r.text)
            check_shape(path, r)
        assert (await client.get("/health")).status_code == 200
        assert app.state.engine.num_running == 0 and app.state.engine.num_waiting == 0
        # and it still generates
        assert (await client.post(TGI, json=tgi())).status_code == 200


@pytest.mark.parametrize("path", [TGI, OAI, "/tokenize"])
@pytest.mark.parametrize(
    ("raw", "ctype", "status"),
    [
        (b'{"inputs": "x"', "application/json", 422),  # truncated JSON
        (b"not json at all", "application/json", 422),
        (b'{"inputs": "\xff\xfe bad utf-8"}', "application/json", 400),
        (b"[1, 2, 3]", "application/json", 422),
        (b"inputs=x", "application/x-www-form-urlencoded", 422),
        (b'{"inputs": NaN, "prompt": NaN, "model": "tiny-gam"}', "application/json", 422),
    ],
)
async def test_bad_raw_bodies(client: httpx.AsyncClient, path: str, raw: bytes, ctype: str, status: int) -> None:
    r = await client.post(path, content=raw, headers={"content-type": ctype})
    expected = 400 if path.startswith("/v1/") and status == 422 else status  # OpenAI answers validation with 400
    assert r.status_code == expected, r.text
    check_shape(path, r)


async def test_malformed_json_names_no_parameter(client: httpx.AsyncClient) -> None:
    """A body that is not JSON blames no parameter: the decode error's location is a character position in the body
    (FastAPI's loc ("body", 37)), which OpenAI's `param` showed as if it named a field ("37"); the position is in the
    message instead."""
    raw = b'{"model": "tiny-gam", "prompt": x}'  # the error is at character 32
    r = await client.post(OAI, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is None, err
    assert "not valid JSON" in err["message"] and "32" in err["message"], err
    r = await client.post(
        TGI, content=b'{"inputs": "x", "parameters": {,}}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"] and "31" in r.json()["error"], r.text


async def test_a_lone_surrogate_echoed_in_an_error_is_escaped(client: httpx.AsyncClient) -> None:
    """An error that quotes the client's text quotes a lone surrogate (a valid JSON escape, not UTF-8) escaped: an
    unknown model named "\\ud800" made the error response's own encoding fail, a 500 and a closed connection."""
    raw = b'{"model": "\\ud800", "prompt": "x"}'
    r = await client.post(OAI, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 404, r.text
    check_shape(OAI, r)
    assert "\\ud800" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", [TGI, OAI])
async def test_body_too_large(make_settings, path: str) -> None:
    async with app_client(make_settings(max_body_bytes=4096)) as (_, client):
        r = await client.post(path, json={"inputs": "x" * 10000, "model": MODEL, "prompt": "x" * 10000})
        assert r.status_code == 413
        check_shape(path, r)

        async def chunks():  # no Content-Length: counted while read
            for _ in range(10):
                yield b" " * 1000

        r = await client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        check_shape(path, r)


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/generate")
    assert r.status_code == 405 and set(r.json()) == {"error", "error_type"}
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
