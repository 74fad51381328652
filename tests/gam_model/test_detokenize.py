"""Incremental detokenizers: streamed text equals the full decode and never holds a broken character; every fast
implementation emits the reference algorithm's text token for token."""

from __future__ import annotations

import functools
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from gam_model.detokenize import (
    ByteDetokenizer,
    ReferenceDetokenizer,
    StreamDetokenizer,
    incremental_detokenizer,
)
from gam_model.tokenizer import BYTE_LEVEL_CHARS, Tokenizer
from tests.gam_model.test_bundled import BUNDLED
from tests.gam_model.tokenizers_for_tests import byte_bpe, corpus, random_unicode_text, whitespace_bpe


@functools.cache
def bundled() -> Tokenizer:
    """The bundled model's tokenizer (byte-level BPE, 8k pieces): the realistic case."""
    return Tokenizer.from_file(BUNDLED / "tokenizer.json")


def stream(tok, ids, prompt_ids=None):
    d = incremental_detokenizer(tok, prompt_ids)
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
    d = StreamDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids)
    assert len(d.ids) < 16  # the decoded window does not grow with the sequence


def test_each_tokenizer_gets_its_cheapest_exact_detokenizer():
    tok = byte_bpe()
    assert isinstance(incremental_detokenizer(tok), ByteDetokenizer)
    assert isinstance(incremental_detokenizer(tok, tok.encode("a prompt")), ByteDetokenizer)
    assert isinstance(incremental_detokenizer(tok, tok.encode("a 🚀")[:-1]), ReferenceDetokenizer)  # cut in the emoji
    assert isinstance(incremental_detokenizer(bundled()), ByteDetokenizer)
    assert isinstance(incremental_detokenizer(whitespace_bpe()), StreamDetokenizer)  # no byte-level decoder


def sequences(tok, rng):
    """Token sequences of random text (multi-byte characters cut anywhere), of WikiText-2 lines, and of random ids
    over the whole vocabulary (special tokens, lone bytes that are no character, pieces that are parts of several),
    and a few ids past the vocabulary."""
    texts = [random_unicode_text(rng, rng.randint(1, 200)) for _ in range(3)] + [" ".join(rng.sample(corpus(), 3))]
    out = [tok.encode(t) for t in texts] + [[rng.randrange(tok.vocab_size) for _ in range(80)]]
    out.append([rng.randrange(tok.vocab_size + 3) for _ in range(40)])
    return out


@pytest.mark.parametrize("make", [byte_bpe, whitespace_bpe, bundled], ids=["byte_bpe", "whitespace_bpe", "bundled"])
@pytest.mark.parametrize("skip_special", [False, True], ids=["special", "skip_special"])
@pytest.mark.parametrize("seed", range(12))
def test_fast_detokenizers_equal_the_reference_token_for_token(make, skip_special, seed):
    """What incremental_detokenizer picks (bytes or DecodeStream), and DecodeStream itself wherever it is exact, emit
    exactly the reference algorithm's text at every token, then the same flush and count, with and without prompt
    context (prompts that end inside a character included), cut anywhere."""
    tok = make()
    rng = random.Random(seed)
    seqs = sequences(tok, rng)
    prompts = [None, seqs[0][:7], [rng.randrange(tok.vocab_size) for _ in range(3)], tok.encode("a 🚀")[:-1]]
    for ids in seqs:
        for prompt in prompts:
            makers = [incremental_detokenizer]
            context = ReferenceDetokenizer(tok, prompt, skip_special).ids
            if not tok.decode(context, skip_special_tokens=skip_special).endswith("\ufffd"):
                makers.append(StreamDetokenizer)
            for cut in (len(ids), max(1, len(ids) - 1), len(ids) // 2):
                ref = ReferenceDetokenizer(tok, prompt, skip_special)
                want = [ref.add(i) for i in ids[:cut]]
                tail = ref.flush()
                for make_detok in makers:
                    d = make_detok(tok, prompt, skip_special)
                    assert [d.add(i) for i in ids[:cut]] == want, (type(d).__name__, prompt, ids[:cut])
                    assert d.flush() == tail
                    assert d.chars == ref.chars


def test_byte_pieces_are_what_the_tokenizer_decodes():
    """Each id's piece decodes as the tokenizer decodes it alone; texts are given only for whole characters."""
    for tok in (byte_bpe(), bundled()):
        for skip in (False, True):
            pieces = tok.byte_pieces(skip)
            assert pieces is not None
            raw, texts = pieces
            assert len(raw) == len(texts) == tok.vocab_size
            for i, (piece, text) in enumerate(zip(raw, texts, strict=True)):
                assert piece.decode("utf-8", "replace") == tok.decode([i], skip_special_tokens=skip)
                assert text is None or text == piece.decode("utf-8")
            special = [i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special]
            assert special  # (both have an end-of-text token)
            assert all((raw[i] == b"") == skip for i in special)
    assert whitespace_bpe().byte_pieces() is None


@pytest.mark.parametrize("make", [byte_bpe, whitespace_bpe])
def test_token_text_is_the_token_decoded_alone(make):
    tok = make()
    ids = list(range(tok.vocab_size))
    random.Random(0).shuffle(ids)
    for i in ids + ids[:50]:  # the second time from the memo
        assert tok.token_text(i) == tok.decode([i])


def test_byte_pieces_refuse_a_vocabulary_of_mostly_holes():
    """An id far above the rest (a sparse vocabulary) would make the table as long as that id: seconds to build and
    memory per missing id (3.6 s for an id of 3 million, unbounded for 2**31). DecodeStream serves it instead."""
    char = {b: c for c, b in BYTE_LEVEL_CHARS.items()}
    vocab = {char[b]: b for b in range(256)}
    vocab[char[0xE2] + char[0x82]] = 2**31 - 1
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    tok = Tokenizer(hf)
    assert tok.byte_pieces() is None  # at once, not after 2**31 decodes
    ids = [ord("a"), 2**31 - 1, 0xAC, 2**31 - 1, 300, ord("b")]
    d, ref = incremental_detokenizer(tok), ReferenceDetokenizer(tok)
    assert isinstance(d, StreamDetokenizer)
    assert [d.add(i) for i in ids] == [ref.add(i) for i in ids]
    assert d.flush() == ref.flush() and d.chars == ref.chars
