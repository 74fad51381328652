"""SSE parsing and request bodies for the TGI and OpenAI streaming APIs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from load_tests import protocols
from load_tests.prompts import PromptSampler
from load_tests.runner import RemoteTargetError, check_target, intervals


def test_tgi_events() -> None:
    tok = {"token": {"id": 5, "text": " a", "logprob": -0.1, "special": False}, "generated_text": None}
    ev = protocols.parse_line("tgi", "data:" + json.dumps(tok))
    assert (ev.kind, ev.text) == ("token", " a")
    # the body asks for details: TGI's stream details carry the prompt's length too (input_length)
    assert protocols.body("tgi", "x", 7)["parameters"]["details"] is True
    details = {"finish_reason": "length", "generated_tokens": 7, "seed": None, "input_length": 3}
    ev = protocols.parse_line("tgi", "data:" + json.dumps(dict(tok, generated_text="x a", details=details)))
    assert (ev.kind, ev.output_tokens, ev.prompt_tokens) == ("final", 7, 3)
    ev = protocols.parse_line("tgi", 'data:{"error":"boom","error_type":"generation"}')
    assert (ev.kind, ev.error) == ("error", "stream:generation")
    assert protocols.parse_line("tgi", ": ping") is None
    assert protocols.parse_line("tgi", "") is None


def test_openai_events() -> None:
    ev = protocols.parse_line("openai", 'data: {"choices":[{"index":0,"text":" b","finish_reason":null}]}')
    assert (ev.kind, ev.text) == ("token", " b")
    ev = protocols.parse_line("openai", 'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}')
    assert (ev.kind, ev.output_tokens, ev.prompt_tokens) == ("empty", 9, 3)
    assert protocols.parse_line("openai", "data: [DONE]").kind == "done"
    ev = protocols.parse_line("openai", 'data: {"error":{"message":"m","type":"server_error"}}')
    assert ev.error == "stream:server_error"
    assert protocols.parse_line("openai", "data: {not json").error == "stream:bad_json"


def test_what_python_json_takes_is_parsed_as_before() -> None:
    """The data Python's json.loads read (a server written in Python: NaN and -Infinity logprobs, a lone surrogate
    escaped) are still events, not bad JSON; nesting too deep for it is bad JSON, not a RecursionError."""
    for extra in (', "logprob": -Infinity', ', "logprob": NaN', ', "special": false, "raw": "\\ud800"'):
        ev = protocols.parse_line("tgi", 'data: {"token": {"id": 5, "text": " a"' + extra + "}}")
        assert (ev.kind, ev.text) == ("token", " a"), extra
    ev = protocols.parse_line("openai", 'data: {"choices": [{"text": " b", "logprobs": {"token_logprobs": [NaN]}}]}')
    assert (ev.kind, ev.text) == ("token", " b")
    assert protocols.parse_line("tgi", "data: " + "[" * 100_000 + "]" * 100_000).error == "stream:bad_json"
    assert protocols.parse_line("openai", "data: \ufeff{}").error == "stream:bad_json"  # a BOM, as json.loads


def test_bodies() -> None:
    b = protocols.body("tgi", "hi", 12)
    assert b == {"inputs": "hi", "parameters": {"max_new_tokens": 12, "details": True}, "stream": True}
    b = protocols.body("openai", "hi", 12, model="m", ignore_eos=True)
    assert b["stream"] and b["stream_options"] == {"include_usage": True} and b["max_tokens"] == 12
    assert b["model"] == "m" and b["ignore_eos"] is True
    with pytest.raises(ValueError):
        protocols.body("grpc", "hi", 1)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.2.1", "http://localhost:9", "http://[::1]:80"])
def test_loopback_targets_are_allowed(url: str) -> None:
    check_target(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "https://example.com", "http://[::2]:80", "http://0.0.0.0"])
def test_remote_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(RemoteTargetError):
        check_target(url)
    check_target(url, allow_remote=True)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_keep_the_rate_and_set_the_burstiness(burstiness: float) -> None:
    it = intervals(rate=5.0, burstiness=burstiness, rng=np.random.default_rng(0))
    gaps = np.array([next(it) for _ in range(20000)])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    # gamma(shape k): coefficient of variation 1/sqrt(k); Poisson arrivals have CV 1
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_prompt_sampler_lengths_and_attribution_skipped() -> None:
    s = PromptSampler(seed=1)
    assert not any(w.startswith("Merity") for w in s.words[:30])  # header comment lines are not prompt text
    for n in (1, 16, 300, 20000):  # longer than the corpus wraps around
        assert len(s.sample(n).split()) == n
    assert PromptSampler(seed=3).sample(50) == PromptSampler(seed=3).sample(50)
