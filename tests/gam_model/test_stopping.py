"""StopChecker: stop strings across tokens, held-back partial matches, eos / stop ids, length."""

from __future__ import annotations

import pytest

from gam_model.detokenize import incremental_detokenizer
from gam_model.stopping import StopChecker, advance
from tests.gam_model.tokenizers_for_tests import byte_bpe


def run(checker: StopChecker, pieces: list[str], token: int = 5) -> tuple[list[str], str | None]:
    out, reason = [], None
    for p in pieces:
        text, reason = checker.feed(token, p)
        out.append(text)
        if reason:
            break
    return out, reason


def test_stop_string_spanning_three_tokens():
    c = StopChecker(["STOP"], eos_token_id=0, stop_token_ids=set(), max_new_tokens=100)
    out, reason = run(c, ["hello S", "T", "O", "P and more"])
    assert reason == "stop_sequence" and c.matched_stop == "STOP"
    assert out == ["hello ", "", "", ""]  # "S", "T", "O" held until resolved; the stop and after never emitted
    assert c.flush() == ""


def test_partial_match_that_fails_is_released():
    c = StopChecker(["STOP"], None, set(), 100)
    out, reason = run(c, ["ab S", "T", "x", "y"])
    assert reason is None
    assert out == ["ab ", "", "STx", "y"]


def test_held_text_released_at_flush():
    c = StopChecker(["</end>"], None, set(), 100)
    out, _ = run(c, ["text </", "en"])
    assert "".join(out) == "text "
    assert c.flush() == "</en"


def test_stop_inside_one_token_and_earliest_wins():
    c = StopChecker(["b", "xyz"], None, set(), 100)
    out, reason = run(c, ["a xyz b c"])
    assert out == ["a "] and reason == "stop_sequence" and c.matched_stop == "xyz"


def test_eos_and_stop_token_ids():
    c = StopChecker(["STOP"], eos_token_id=2, stop_token_ids=set(), max_new_tokens=10)
    assert c.feed(7, "go S") == ("go ", None)
    assert c.feed(2, "<eos>") == ("S", "eos_token")  # held text released, the eos text dropped
    assert c.matched_token == 2
    c = StopChecker([], eos_token_id=None, stop_token_ids={9}, max_new_tokens=10)
    assert c.feed(9, "x") == ("", "eos_token")


def test_length():
    c = StopChecker(["STOP"], 0, set(), max_new_tokens=3)
    assert c.feed(5, "a") == ("a", None)
    assert c.feed(5, "ST") == ("", None)
    assert c.feed(5, "O") == ("STO", "length")  # the last token releases everything
    with pytest.raises(RuntimeError):
        c.feed(5, "x")


def test_stop_beats_length_on_the_last_token():
    c = StopChecker(["ab"], 0, set(), max_new_tokens=2)
    assert c.feed(5, "xa") == ("x", None)
    assert c.feed(5, "b") == ("", "stop_sequence")


def test_rejects_empty_stop_strings():
    with pytest.raises(ValueError):
        StopChecker([""], 0, set(), 10)
    with pytest.raises(ValueError):
        StopChecker(["a"], 0, set(), 0)


def test_advance_with_real_detokenizer():
    """Stop string inside a multi-byte token stream, end-to-end with the byte-level detokenizer."""
    tok = byte_bpe()
    ids = tok.encode("Lobsters 🦞 are blue. ### Next")
    detok = incremental_detokenizer(tok)
    stop = StopChecker(["###"], tok.eos_token_id, set(), 100)
    text, reason = "", None
    for i in ids:
        t, reason = advance(detok, stop, i)
        text += t
        if reason:
            break
    assert (text, reason) == ("Lobsters 🦞 are blue. ", "stop_sequence")


def test_advance_flushes_detokenizer_on_length():
    tok = byte_bpe()
    ids = tok.encode("ok 🚀")
    detok = incremental_detokenizer(tok)
    stop = StopChecker([], None, set(), max_new_tokens=len(ids) - 1)
    text = "".join(advance(detok, stop, i)[0] for i in ids[:-1])
    assert stop.finish_reason == "length"
    assert text == tok.decode(ids[:-1])  # the unfinished character is released, not lost
