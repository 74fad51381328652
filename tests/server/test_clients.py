"""The real clients, unchanged, against a real uvicorn on 127.0.0.1: openai, text-generation, huggingface_hub."""

from __future__ import annotations

import warnings

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from text_generation import Client as TGIClient
from text_generation.errors import OverloadedError, ValidationError

PROMPT = "The game was"


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    from tests.server.conftest import LiveServer, tiny_settings

    with LiveServer(tiny_settings(checkpoint_dir)) as s:
        yield s


def test_openai_client(server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    (model,) = [m.id for m in client.models.list()]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert len(out.choices[0].logprobs.token_logprobs) == 8
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    many = client.completions.create(model=model, prompt=[PROMPT, "In the city"], n=2, max_tokens=4, seed=3)
    assert len(many.choices) == 4
    # the request lm-evaluation-harness makes for loglikelihoods: echo the prompt with its logprobs
    scored = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith(PROMPT) and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy


def test_text_generation_client(server) -> None:
    client = TGIClient(server.url, timeout=30)
    out = client.generate(PROMPT, max_new_tokens=9, top_n_tokens=2)
    assert out.details.finish_reason.value == "length" and out.details.generated_tokens == 9
    assert len(out.details.top_tokens) == 9
    stream = list(client.generate_stream(PROMPT, max_new_tokens=9))
    assert "".join(r.token.text for r in stream) == out.generated_text == stream[-1].generated_text
    assert stream[-1].details.generated_tokens == 9
    scored = client.generate(PROMPT, max_new_tokens=1, decoder_input_details=True)
    assert scored.details.prefill[0].logprob is None and len(scored.details.prefill) > 1
    assert all(t.logprob is not None and t.logprob <= 0 for t in scored.details.prefill[1:])
    sampled = client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=11, temperature=0.7)
    assert sampled == client.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=11, temperature=0.7)
    with pytest.raises(ValidationError):
        client.generate(PROMPT, max_new_tokens=10_000)
    with pytest.raises(ValidationError):
        client.generate(PROMPT, max_new_tokens=2, stop_sequences=["a"] * 9)
    assert OverloadedError  # the 429 path is tested in test_engine.py


def test_huggingface_hub_client(server) -> None:
    client = InferenceClient(model=server.url, timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        text = client.text_generation(PROMPT, max_new_tokens=7)
        details = client.text_generation(PROMPT, max_new_tokens=7, details=True)
        streamed = list(client.text_generation(PROMPT, max_new_tokens=7, stream=True))
        streamed_details = list(client.text_generation(PROMPT, max_new_tokens=7, stream=True, details=True))
        scored = client.text_generation(PROMPT, max_new_tokens=1, details=True, decoder_input_details=True)
    assert scored.details.prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in scored.details.prefill[1:])
    assert isinstance(text, str) and text == details.generated_text == "".join(streamed)
    assert details.details.finish_reason == "length" and len(details.details.tokens) == 7
    assert streamed_details[-1].generated_text == text and streamed_details[-1].details.generated_tokens == 7
