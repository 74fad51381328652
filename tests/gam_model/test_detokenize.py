"""IncrementalDetokenizer: streamed text equals the full decode and never holds a broken character."""

from __future__ import annotations

import random

import pytest

from gam_model.detokenize import IncrementalDetokenizer, ReferenceDetokenizer
from tests.gam_model.tokenizers_for_tests import byte_bpe, random_unicode_text, whitespace_bpe


def stream(tok, ids, prompt_ids=None):
    d = IncrementalDetokenizer(tok, prompt_ids)
    chunks = [d.add(i) for i in ids]
    tail = d.flush()
    return d, chunks, tail


@pytest.mark.parametrize("seed", range(20))
def test_random_unicode_matches_full_decode(seed):
    tok = byte_bpe()
    rng = random.Random(seed)
    text = random_unicode_text(rng, rng.randint(1, 120))
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level BPE round-trips any string
    d, chunks, tail = stream(tok, ids)
    assert "".join(chunks) + tail == tok.decode(ids)
    assert d.chars == len(tok.decode(ids))
    assert not any("\ufffd" in c for c in chunks)


def test_multi_token_characters_are_held_back():
    tok = byte_bpe()
    ids = tok.encode("a🚀")
    assert len(ids) >= 3  # the emoji's 4 bytes span several tokens
    _, chunks, tail = stream(tok, ids)
    assert chunks[-1] == "🚀" or chunks[-1].endswith("🚀")
    assert all(c == "" for c in chunks[1:-1])  # nothing emitted while the character is incomplete
    assert tail == ""


def test_flush_releases_an_unfinished_character():
    tok = byte_bpe()
    ids = tok.encode("ok 🚀")
    _, chunks, tail = stream(tok, ids[:-1])  # cut inside the emoji
    assert "".join(chunks) == "ok "
    assert tail == tok.decode(ids[:-1])[len("ok ") :]
    assert tail.endswith("\ufffd")


def test_byte_level_spacing_with_prompt_context():
    tok = byte_bpe()
    prompt, completion = "The lobster is", " a large crustacean, blue in life."
    p_ids, c_ids = tok.encode(prompt), tok.encode(completion)
    _, chunks, tail = stream(tok, c_ids, prompt_ids=p_ids)
    assert "".join(chunks) + tail == tok.decode(p_ids + c_ids)[len(tok.decode(p_ids)) :]


def test_whitespace_pretokenizer_spacing():
    """The paper's tokenizer style (no decoder): decode joins tokens with spaces; the stream must too."""
    tok = whitespace_bpe()
    p_ids = tok.encode("Homarus gammarus is")
    c_ids = tok.encode("a species of lobster from the eastern Atlantic Ocean")
    _, chunks, tail = stream(tok, c_ids, prompt_ids=p_ids)
    assert "".join(chunks) + tail == tok.decode(p_ids + c_ids)[len(tok.decode(p_ids)) :]
    assert chunks[0] == " a"
    _, chunks, tail = stream(tok, c_ids)
    assert "".join(chunks) + tail == tok.decode(c_ids)


def test_long_stream_keeps_window_bounded():
    tok = byte_bpe()
    ids = tok.encode(random_unicode_text(random.Random(7), 2000))
    d, chunks, tail = stream(tok, ids)
    assert "".join(chunks) + tail == tok.decode(ids)
    assert len(d.ids) < 16  # the decoded window does not grow with the sequence


@pytest.mark.parametrize("make", [byte_bpe, whitespace_bpe])
@pytest.mark.parametrize("seed", range(20))
def test_rust_step_equals_the_reference_token_for_token(make, seed):
    """The DecodeStream-backed detokenizer emits exactly the reference algorithm's text at every token, then the same
    flush, for random text (multi-byte characters cut anywhere) and random ids (special tokens included), with and
    without prompt context."""
    tok = make()
    rng = random.Random(seed)
    texts = [random_unicode_text(rng, rng.randint(1, 200)) for _ in range(3)]
    sequences = [tok.encode(t) for t in texts] + [[rng.randrange(tok.vocab_size) for _ in range(80)]]
    for ids in sequences:
        for prompt in (None, sequences[0][:7], [rng.randrange(tok.vocab_size) for _ in range(3)]):
            for cut in (len(ids), max(1, len(ids) - 1), len(ids) // 2):
                fast, ref = IncrementalDetokenizer(tok, prompt), ReferenceDetokenizer(tok, prompt)
                assert [fast.add(i) for i in ids[:cut]] == [ref.add(i) for i in ids[:cut]]
                assert fast.flush() == ref.flush()
                assert fast.chars == ref.chars


@pytest.mark.parametrize("make", [byte_bpe, whitespace_bpe])
def test_token_text_is_the_token_decoded_alone(make):
    tok = make()
    ids = list(range(tok.vocab_size))
    random.Random(0).shuffle(ids)
    for i in ids + ids[:50]:  # the second time from the memo
        assert tok.token_text(i) == tok.decode([i])
