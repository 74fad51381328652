"""BatchCore: the vectorised finish checks give StopChecker's verdict for every row; columns line up; a failed call
ends only its own sequences; remove frees the slot."""

from __future__ import annotations

import random

import pytest

from gam_model.batch import BatchCore, SequenceSpec
from gam_model.decode import Decoder
from gam_model.detokenize import IncrementalDetokenizer
from gam_model.sampling import SamplingParams
from gam_model.stopping import StopChecker, advance_token
from tests.conftest import tiny_model
from tests.gam_model.test_generate import PROMPTS


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=5, vocab_size=tok.vocab_size, block_size=24)


def run(core: BatchCore, specs: dict[int, SequenceSpec]) -> dict[int, tuple[list[int], str]]:
    """Drive the core to the end: key -> (tokens, finish reason), checking the columns on the way."""
    waiting = list(specs)
    toks: dict[int, list[int]] = {k: [] for k in specs}
    done: dict[int, tuple[list[int], str]] = {}
    while waiting or len(core):
        while waiting and core.free_slots:
            k = waiting.pop(0)
            core.add(k, specs[k])
        out = core.step()
        assert not out.failed
        assert len(out.keys) == len(out.tokens) == len(out.logprobs) == out.stepped + out.prefilled
        for row, (k, t) in enumerate(zip(out.keys.tolist(), out.tokens.tolist(), strict=True)):
            toks[k].append(t)
            if row in out.finished:
                assert out.finished[row].generated == len(toks[k])
                done[k] = (toks[k], out.finished[row].reason)
    return done


def verdict(tok, spec: SequenceSpec, tokens: list[int]) -> tuple[int, str]:
    """Where and why StopChecker, fed one token at a time, ends this token sequence."""
    detok = IncrementalDetokenizer(tok, spec.prompt_ids)
    stop = StopChecker(spec.stop, tok.eos_token_id, spec.stop_token_ids, spec.max_new_tokens)
    for i, t in enumerate(tokens):
        reason = advance_token(detok, stop, t)[2]
        if reason is not None:
            return i + 1, reason
    return len(tokens), "running"


def test_vectorised_finish_checks_agree_with_the_stop_checker(model, tok) -> None:
    """Random mixes of eos, stop token ids, stop strings, lengths, penalties and top-n in one batch: every row ends
    exactly where and why StopChecker says."""
    rng = random.Random(0)
    specs = {}
    for k in range(24):
        params = SamplingParams(
            temperature=rng.choice([0.0, 1.0, 1.5]),
            seed=k,
            top_n_tokens=rng.choice([0, 0, 2]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
        )
        specs[k] = SequenceSpec(
            prompt_ids=tok.encode(rng.choice(PROMPTS)),
            params=params,
            max_new_tokens=rng.choice([1, 2, 7, 30]),
            stop_token_ids=set(rng.sample(range(40), rng.choice([0, 0, 3]))),
        )
    # stop strings that do occur: pieces of what the rows generate without them
    first = run(BatchCore(Decoder(model, 5), tok), specs)
    for k, spec in specs.items():
        text = tok.decode(first[k][0])
        if len(text) >= 4 and rng.random() < 0.6:
            i = rng.randrange(len(text) - 2)
            spec.stop = [text[i : i + 2], "\u00e9"]
    done = run(BatchCore(Decoder(model, 5), tok), specs)
    assert set(done) == set(specs)
    reasons = set()
    for k, (tokens, reason) in done.items():
        assert verdict(tok, specs[k], tokens) == (len(tokens), reason), k
        reasons.add(reason)
    assert reasons == {"length", "stop_sequence", "eos_token"}  # the mix reached every kind of finish


def test_eos_ends_a_row(model, tok) -> None:
    """A row whose greedy continuation hits eos ends there with eos_token, in the array compare path."""
    spec = SequenceSpec(tok.encode("The lobster"), SamplingParams(temperature=0), 12)
    ((tokens, _),) = run(BatchCore(Decoder(model, 1), tok), {0: spec}).values()
    eos_spec = SequenceSpec(spec.prompt_ids, spec.params, 12, stop_token_ids=set())
    core = BatchCore(Decoder(model, 1), tok)
    core.eos = tokens[3]  # the 4th greedy token plays eos
    ((got, reason),) = run(core, {0: eos_spec}).values()
    assert got == tokens[: tokens.index(tokens[3]) + 1] and reason == "eos_token"


def test_failed_step_ends_only_the_stepping_rows_and_remove_frees_a_slot(model, tok) -> None:
    core = BatchCore(Decoder(model, 4), tok)
    greedy = SamplingParams(temperature=0)
    for k in range(3):
        core.add(k, SequenceSpec(tok.encode(PROMPTS[k]), greedy, 10))
    core.step()  # prefill
    assert core.remove(2) == 1 and core.free_slots == 2  # generated one token; slot back
    core.add(7, SequenceSpec(tok.encode(PROMPTS[3]), greedy, 10))

    def fail() -> None:
        raise RuntimeError("boom")

    core.before_step = fail
    out = core.step()
    assert sorted(k for k, _ in out.failed) == [0, 1] and all("boom" in m for _, m in out.failed)
    assert out.keys.tolist() == [7] and out.prefilled == 1 and out.stepped == 0  # the new row was prefilled
    assert len(core) == 1 and core.free_slots == 3
    core.before_step = None
    assert core.step().keys.tolist() == [7]
