"""lm-evaluation-harness, unchanged, against a real uvicorn on 127.0.0.1: loglikelihood and generate_until.

lm-eval runs in its own virtualenv (`make test` builds .venv-lm-eval and sets GAM_LM_EVAL_PYTHON): it needs
huggingface_hub >= 1 while the TGI client in the main venv pins < 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from gam_model.checkpoint import load_checkpoint
from gam_model.evaluate import evaluate_text
from gam_model.scoring import token_logprobs
from tests.server.conftest import MODEL_ID, LiveServer, tiny_settings

LM_EVAL_PYTHON = os.environ.get("GAM_LM_EVAL_PYTHON")
CLIENT = Path(__file__).parent / "clients" / "lm_eval_client.py"
PAIRS = [
    ("The game was played", " at the stadium in the city"),
    ("The season ." * 20, " The season ."),  # past block_size (48): the sliding-window semantics
]
ROLLING = "The season . It was played at the stadium in the city ." * 6  # past block_size, within max_length (256)
pytestmark = pytest.mark.skipif(not LM_EVAL_PYTHON, reason="needs lm-eval's venv (make test sets GAM_LM_EVAL_PYTHON)")


@pytest.fixture(scope="module")
def server(checkpoint_dir: Path):
    with LiveServer(tiny_settings(checkpoint_dir)) as s:
        yield s


def test_lm_eval_local_completions(server, checkpoint_dir: Path) -> None:
    spec = {"loglikelihood": PAIRS, "generate_until": [["The game was", ["."], 8]], "rolling": [ROLLING]}
    out = subprocess.run(
        [str(LM_EVAL_PYTHON), str(CLIENT), server.url, MODEL_ID, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokenizer"] == "RemoteTokenizer"  # found /tokenizer_info and /tokenize
    model, tok, _ = load_checkpoint(checkpoint_dir)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, res["loglikelihood"], strict=True):
        whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))  # lm-eval's split (no trailing space here)
        lp = token_logprobs(model, torch.tensor(whole), top_n=1)
        assert ll == pytest.approx(sum(lp.logprobs[n_ctx - 1 :]), abs=1e-3)
        want_greedy = all(whole[i + 1] == lp.top_ids[i][0] for i in range(n_ctx - 1, len(whole) - 1))
        assert greedy == want_greedy
    # loglikelihood_rolling (perplexity tasks): one window while the text fits lm-eval's max_length, so it is gam-eval's
    # exact sliding-window NLL of the text (both open it with the eos token)
    assert res["rolling"] == [pytest.approx(-evaluate_text(model, tok, ROLLING).nll, abs=1e-3)]
    # generate_until: greedy text up to the stop string, as the OpenAI API answers it
    body = {"model": MODEL_ID, "prompt": "The game was", "max_tokens": 8, "temperature": 0, "stop": ["."]}
    want = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    assert res["generate_until"] == [want]
