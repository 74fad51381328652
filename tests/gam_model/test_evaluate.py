"""gam-eval scoring equals a token-by-token hand computation from the reference forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.cli.evaluate import main as eval_main
from gam_model.data import encode_stream, read_text, train_tokenizer
from gam_model.evaluate import evaluate_text, score_chunks, score_tokens
from tests.conftest import tiny_model

FIXTURES = Path(__file__).parent.parent / "fixtures"


def hand_nll(model, ids: torch.Tensor) -> float:
    """Each token's logits from a full forward over the last min(N, block_size) tokens of its context."""
    bs = model.config.block_size
    total = 0.0
    with torch.no_grad():
        for i in range(len(ids) - 1):
            ctx = ids[max(0, i - bs + 1) : i + 1]
            logits = model(ctx.unsqueeze(0))[0, -1].double()
            total -= F.log_softmax(logits, -1)[ids[i + 1]].item()
    return total


@pytest.mark.parametrize(("n", "kernel", "layers"), [(20, 3, 2), (32, 3, 2), (33, 3, 2), (100, 4, 3), (5, 3, 2)])
def test_score_tokens_matches_hand_computation(n, kernel, layers):
    model = tiny_model(seed=n, block_size=32, conv_kernel=kernel, n_layer=layers)
    ids = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
    nll, count = score_tokens(model, ids, batch_size=7)
    assert count == n - 1
    assert nll == pytest.approx(hand_nll(model, ids), rel=1e-5, abs=1e-4)


def test_evaluate_text_on_fixture_longer_than_block(tmp_path):
    train = FIXTURES / "wikitext2_train_excerpt.txt"
    tok = train_tokenizer([train], "bytelevel", vocab_size=300)
    text = read_text(FIXTURES / "wikitext2_valid_excerpt.txt")[:1500]
    model = tiny_model(seed=3, vocab_size=tok.vocab_size, block_size=64)
    ids = torch.from_numpy(encode_stream(tok, text))
    assert len(ids) > 3 * 64
    r = evaluate_text(model, tok, text, batch_size=50)
    assert r.tokens == len(ids) - 1
    assert r.bytes == len(text.encode())
    assert r.nll == pytest.approx(hand_nll(model, ids), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / r.bytes)
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens))

    # the CLI reports the same numbers for a saved checkpoint
    d = save_checkpoint(
        tmp_path / "ckpt", model, tok, CheckpointMeta(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    )
    (tmp_path / "t.txt").write_bytes(text.encode())
    eval_main(["--model", str(d), str(tmp_path / "t.txt"), "--json", str(tmp_path / "r.json")])
    got = json.loads((tmp_path / "r.json").read_text())["results"][str(tmp_path / "t.txt")]
    assert got["tokens"] == r.tokens
    assert got["nll"] == pytest.approx(r.nll, rel=1e-5)


def test_chunked_mode_scores_each_chunk_from_its_start():
    model = tiny_model(seed=5, block_size=16)
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(5))
    nll, n = score_chunks(model, ids)
    want = 0.0
    with torch.no_grad():
        for s in range(0, 49, 16):
            x, y = ids[s : min(s + 16, 49)], ids[s + 1 : min(s + 16, 49) + 1]
            want -= F.log_softmax(model(x.unsqueeze(0))[0].double(), -1).gather(1, y.unsqueeze(1)).sum().item()
    assert n == 49 and nll == pytest.approx(want, rel=1e-5)
    assert nll != pytest.approx(score_tokens(model, ids)[0], rel=1e-3)  # past block_size the two differ
