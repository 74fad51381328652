"""gam_model.tokenizer: Tokenizer.encode (encode_batch_fast, no offsets) gives the ids an Encoding has."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from gam_model.tokenizer import Tokenizer
from tests.gam_model.test_bundled import BUNDLED
from tests.gam_model.tokenizers_for_tests import EOS, byte_bpe, corpus, random_unicode_text, whitespace_bpe


def texts() -> list[str]:
    rng = random.Random(7)
    lines = corpus()
    # single lines, whole paragraphs, the special token inside text, unusual whitespace, nothing
    return [
        *lines,
        "\n".join(lines[:40]),
        f"a{EOS}b {EOS}",
        "  leading and trailing  ",
        "\r\n\t\u00a0\u2028",
        "",
        *(random_unicode_text(rng, 300) for _ in range(10)),
    ]


@pytest.mark.parametrize("make", [byte_bpe, whitespace_bpe], ids=["byte_bpe", "whitespace_bpe"])
@pytest.mark.parametrize("special", [False, True])
def test_encode_gives_the_ids_of_a_full_encoding(make, special):
    tok = make()
    for text in texts():
        assert tok.encode(text, special) == tok.tok.encode(text, add_special_tokens=special).ids, text[:80]


def test_encode_with_the_bundled_tokenizer():
    tok = Tokenizer.from_file(BUNDLED / "tokenizer.json")
    for text in texts():
        assert tok.encode(text) == tok.tok.encode(text, add_special_tokens=False).ids, text[:80]


def test_encode_adds_special_tokens_only_when_asked():
    """With a post-processor that opens every text with eos (as a checkpoint's tokenizer.json may have: the test
    tokenizers and the bundled one have none, so `add_special_tokens` changed nothing above), the flag still reaches
    the tokenizer: vLLM's /tokenize `add_special_tokens` and gam-model callers get what a full Encoding has."""
    hf = HFTokenizer.from_str(byte_bpe().tok.to_str())
    eos = hf.token_to_id(EOS)
    hf.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, eos)])
    tok = Tokenizer(hf, eos_token_id=eos)
    for text in texts():
        with_special, without = tok.encode(text, True), tok.encode(text)
        assert with_special == hf.encode(text, add_special_tokens=True).ids, text[:80]
        assert without == hf.encode(text, add_special_tokens=False).ids, text[:80]
        assert with_special == [eos, *without], text[:80]
