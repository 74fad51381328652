"""generate(): batched output equals each prompt alone; streaming, stops, slots reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.cli import generate as cli_generate
from gam_model.cli.generate import main
from gam_model.decode import Decoder
from gam_model.generate import generate
from gam_model.sampling import SamplingParams
from tests.conftest import tiny_model

PROMPTS = ["The lobster", "Homarus gammarus is a large", "é", "In life , the lobsters are blue , only becoming red"]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=3, vocab_size=tok.vocab_size, block_size=24)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation with the full forward on the cropped context (DESIGN 1.3)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-model.config.block_size :]]))[0, -1]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_greedy_batched_equals_alone_and_reference(model, tok):
    greedy = SamplingParams(temperature=0)
    batched = generate(Decoder(model, 8), tok, PROMPTS, greedy, max_new_tokens=30)
    for p, r in zip(PROMPTS, batched, strict=True):
        alone = generate(Decoder(model, 1), tok, [p], greedy, max_new_tokens=30)[0]
        assert r.token_ids == alone.token_ids and r.text == alone.text
        assert r.finish_reason == "length" and len(r.token_ids) == 30  # crosses block_size=24
        assert r.token_ids == reference_greedy(model, tok.encode(p), 30)
        assert r.text == tok.decode(r.token_ids)


def test_more_prompts_than_slots_reuses_slots(model, tok):
    greedy = SamplingParams(temperature=0)
    lens = [3, 9, 5, 12, 1, 7]
    wide = generate(Decoder(model, 8), tok, PROMPTS[:3] * 2, greedy, max_new_tokens=lens)
    narrow = generate(Decoder(model, 2), tok, PROMPTS[:3] * 2, greedy, max_new_tokens=lens)
    assert [r.token_ids for r in wide] == [r.token_ids for r in narrow]
    assert [len(r.token_ids) for r in narrow] == lens


def test_seeded_sampling_is_batch_invariant(model, tok):
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=42, top_n_tokens=3)
    alone = generate(Decoder(model, 1), tok, [PROMPTS[1]], target, max_new_tokens=20)[0]
    others = [SamplingParams(temperature=0), SamplingParams(seed=1, repetition_penalty=1.3), SamplingParams(top_k=5)]
    batch = generate(
        Decoder(model, 4),
        tok,
        [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
        [others[0], target, others[1], others[2]],
        max_new_tokens=20,
    )
    assert batch[1].token_ids == alone.token_ids and batch[1].seed == 42
    assert batch[1].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert len(alone.top_tokens) == 20 and all(len(t) == 3 for t in alone.top_tokens)


def test_streamed_text_and_stop_sequence(model, tok):
    greedy = SamplingParams(temperature=0)
    full = generate(Decoder(model, 2), tok, [PROMPTS[0]], greedy, max_new_tokens=30)[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop  # the greedy text is long enough to cut
    streamed: list[str] = []
    r = generate(
        Decoder(model, 2),
        tok,
        [PROMPTS[0]],
        greedy,
        max_new_tokens=30,
        stop=[stop],
        on_text=lambda i, t: streamed.append(t),
    )[0]
    assert r.finish_reason == "stop_sequence" and r.matched_stop == stop
    assert r.text == full.text[: full.text.index(stop)]
    assert "".join(streamed) == r.text


def test_eos_token_id_ends_the_row(model, tok):
    greedy = SamplingParams(temperature=0)
    full = generate(Decoder(model, 1), tok, [PROMPTS[2]], greedy, max_new_tokens=12)[0]
    stop_id = full.token_ids[5]
    r = generate(Decoder(model, 1), tok, [PROMPTS[2]], greedy, max_new_tokens=12, stop_token_ids={stop_id})[0]
    first = full.token_ids.index(stop_id)
    assert r.finish_reason == "eos_token" and r.token_ids == full.token_ids[: first + 1]
    assert r.text == tok.decode(full.token_ids[:first])


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="top_p"):
        generate(Decoder(model, 1), tok, ["x"], SamplingParams(top_p=0), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(Decoder(model, 1), tok, ["x", "y"], SamplingParams(), max_new_tokens=[3])


def test_cli_prints_and_streams_the_same_text(model, tok, tmp_path, capsys):
    d = save_checkpoint(tmp_path / "ckpt", model, tok, CheckpointMeta(eos_token_id=tok.eos_token_id))
    expect = generate(Decoder(model, 1), tok, [PROMPTS[1]], SamplingParams(temperature=0), max_new_tokens=15)[0]
    args = ["--model", str(d), "--prompt", PROMPTS[1], "--max-new-tokens", "15", "--temperature", "0"]
    main(args)
    assert capsys.readouterr().out == expect.text + "\n"
    main([*args, "--stream"])
    assert capsys.readouterr().out == expect.text + "\n"
    main(["--model", str(d), "--prompt", "a", "--prompt", "b", "--max-new-tokens", "4", "--seed", "3", "--verbose"])
    captured = capsys.readouterr()
    assert captured.err.count("[seed 3, 4 tokens, finish length]") == 2
    with pytest.raises(SystemExit):
        main(["--model", str(d), "--prompt", "x", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match=r"no config\.json"):
        main(["--model", str(tmp_path), "--prompt", "x"])


def test_cli_default_model_is_the_single_one_under_weights(model, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_generate, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="holds no model; pass --model"):
        main(["--prompt", "x"])
    save_checkpoint(tmp_path / "bundled", model, tok, CheckpointMeta())
    main(["--prompt", "x", "--max-new-tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.endswith("\n")
    save_checkpoint(tmp_path / "other", model, tok, CheckpointMeta())
    with pytest.raises(SystemExit, match=r"holds 2 models \(bundled, other\)"):
        main(["--prompt", "x"])


def test_cli_loads_checkpoints_as_gam_serve_does(model, tok, tmp_path, capsys):
    """gam-generate's --dtype and --quantize mean what gam-serve's do (auto by default), so a pre-quantized
    checkpoint runs with the default flags, and `--quantize int8` gives the text the server's `--quantize int8` gives
    (gam_model.generate on the model load_checkpoint makes; the server's engine core loads it the same way). The
    default had been an explicit fp32, which a checkpoint pre-quantized for bf16 refuses, with a message naming flags
    gam-generate did not have."""
    from gam_model.checkpoint import load_checkpoint
    from gam_model.cli.quantize import main as quantize_main

    src = save_checkpoint(tmp_path / "ckpt", model, tok, CheckpointMeta(eos_token_id=tok.eos_token_id))
    quantize_main([str(src), str(tmp_path / "q")])
    capsys.readouterr()
    args = ["--prompt", PROMPTS[3], "--max-new-tokens", "12", "--temperature", "0"]

    def want(d, **kw) -> str:
        m, t, _ = load_checkpoint(d, **kw)
        return generate(Decoder(m, 1), t, [PROMPTS[3]], SamplingParams(temperature=0), max_new_tokens=12)[0].text

    for d, extra, kw in [
        (tmp_path / "q", [], {}),  # pre-quantized: int8 in bf16, as made
        (tmp_path / "q", ["--dtype", "bfloat16"], {}),  # gam-serve's spelling, which the refusal message names
        (src, ["--quantize", "int8"], {"quantize": "int8"}),  # quantized at load: bf16 activations
        (src, ["--quantize", "int8", "--dtype", "float32"], {"quantize": "int8", "dtype": torch.float32}),
        (src, ["--dtype", "bf16"], {"dtype": torch.bfloat16}),
    ]:
        main(["--model", str(d), *args, *extra])
        assert capsys.readouterr().out == want(d, **kw) + "\n", extra
    with pytest.raises(SystemExit, match=r"pre-quantized for bfloat16 activations"):
        main(["--model", str(tmp_path / "q"), *args, "--dtype", "float32"])


BUNDLED = Path(__file__).resolve().parents[2] / "weights" / "gam-wikitext2"
TEXT = (Path(__file__).resolve().parents[1] / "fixtures" / "wikitext2_valid_head.txt").read_text()


@pytest.mark.slow
def test_cli_deterministic_reproduces_a_deterministic_server(capsys):
    """`gam-serve --deterministic` answers a seeded request with bits a default-mode Decoder need not reproduce (other
    GEMM shapes: in bf16 the bundled model's seeded tokens differed within 40 tokens for 4 of 6 prompts), so
    gam-generate has the same flag: a prompt's text is the deterministic Decoder's (the engine core's), alone or
    beside other prompts."""
    from gam_model.checkpoint import load_checkpoint

    m, tok, _ = load_checkpoint(BUNDLED, dtype=torch.bfloat16)
    prompts = [" the", TEXT[:300], TEXT[1000:1100]]
    args = ["--model", str(BUNDLED), "--max-new-tokens", "40", "--temperature", "0.8", "--seed", "103"]
    args += ["--dtype", "bf16", "--deterministic"]
    main([*args, "--prompt", prompts[0]])
    alone = capsys.readouterr().out
    main([*args, *(a for p in prompts for a in ("--prompt", p))])
    beside = capsys.readouterr().out  # prompts[0]'s text first (a text may hold line breaks)
    params = SamplingParams(temperature=0.8, seed=103)
    want = generate(Decoder(m, 8, deterministic=True), tok, prompts[:1], params, max_new_tokens=40)[0].text
    assert alone == want + "\n" and beside.startswith(want + "\n")
