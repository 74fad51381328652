"""BatchCore: the vectorised finish checks give StopChecker's verdict for every row; columns line up; a failed call
ends only its own sequences; remove frees the slot."""

from __future__ import annotations

import collections
import random

import pytest
import torch

from gam_model.batch import BatchCore, SequenceSpec
from gam_model.decode import Decoder
from gam_model.detokenize import Detokenizer, incremental_detokenizer
from gam_model.sampling import SamplingParams
from gam_model.stopping import StopChecker, advance_token
from tests.conftest import tiny_model
from tests.gam_model.test_generate import PROMPTS


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=5, vocab_size=tok.vocab_size, block_size=24)


Result = tuple[list[int], list[float], list, str]


def drive(
    core: BatchCore,
    specs: dict[int, SequenceSpec] | None = None,
    cancel: dict[int, int] | None = None,
    failures: bool = False,
) -> dict[int, Result]:
    """Run the core to the end (adding `specs` as slots free up, removing key k once it has `cancel[k]` tokens),
    checking the columns on the way: key -> (tokens, logprobs, top-n, how it ended: finish reason, "cancelled" or,
    when `failures` are allowed, the failure message)."""
    waiting, cancel = list(specs or {}), cancel or {}
    got: dict[int, tuple[list[int], list[float], list]] = collections.defaultdict(lambda: ([], [], []))
    done: dict[int, Result] = {}
    while waiting or len(core):
        while waiting and core.free_slots:
            k = waiting.pop(0)
            core.add(k, (specs or {})[k])
        out = core.step()
        assert failures or not out.failed
        assert len(out.keys) == len(out.tokens) == len(out.logprobs) == out.stepped + out.prefilled
        cols = zip(out.keys.tolist(), out.tokens.tolist(), out.logprobs.tolist(), strict=True)
        for row, (k, t, lp) in enumerate(cols):
            assert k not in done, f"a token for {k} after it ended"
            got[k][0].append(t)
            got[k][1].append(lp)
            got[k][2].append(out.top.get(row))
            if row in out.finished:
                assert out.finished[row].generated == len(got[k][0])
                done[k] = (*got[k], out.finished[row].reason)
            elif cancel.get(k) == len(got[k][0]):
                assert core.remove(k) == cancel[k]
                done[k] = (*got[k], "cancelled")
        for k, message in out.failed:
            done[k] = (*got[k], message)
    return done


def run(core: BatchCore, specs: dict[int, SequenceSpec]) -> dict[int, tuple[list[int], str]]:
    """Drive the core to the end: key -> (tokens, finish reason)."""
    return {k: (r[0], r[3]) for k, r in drive(core, specs).items()}


def verdict(tok, spec: SequenceSpec, tokens: list[int]) -> tuple[int, str]:
    """Where and why StopChecker, fed one token at a time, ends this token sequence."""
    detok = incremental_detokenizer(tok, spec.prompt_ids)
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


# -- overlap: step t+1 is launched before step t is collected --------------------------------------------------
def mixed_specs(tok, n: int, seed: int) -> dict[int, SequenceSpec]:
    """Every kind of row: greedy and seeded, warpers, penalties, logit bias, top-n, stop ids and strings, lengths."""
    rng = random.Random(seed)
    specs = {}
    for k in range(n):
        params = SamplingParams(
            temperature=rng.choice([0.0, 1.0, 0.7]),
            top_k=rng.choice([0, 0, 5]),
            top_p=rng.choice([1.0, 1.0, 0.8]),
            typical_p=rng.choice([1.0, 1.0, 0.9]),
            seed=k,
            top_n_tokens=rng.choice([0, 0, 3]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.4]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.8]),
            presence_penalty=rng.choice([0.0, 0.0, -0.5]),
            logit_bias=rng.choice([None, None, {rng.randrange(40): 6.0}]),
        )
        specs[k] = SequenceSpec(
            prompt_ids=tok.encode(rng.choice(PROMPTS)),
            params=params,
            max_new_tokens=rng.choice([1, 2, 9, 30]),
            stop=rng.choice([[], [], [" ", "e"]]),
            stop_token_ids=set(rng.sample(range(40), rng.choice([0, 0, 2]))),
        )
    return specs


def test_overlap_gives_the_same_results_one_step_later(model, tok) -> None:
    """Deterministic decode (a row's bits do not depend on its neighbours, so the extra rows an overlapped step
    carries cannot move them): overlap changes no token, logprob, top-n or finish, whatever the row mix, the
    admissions into freed slots and the removals while a step is in flight."""
    specs = mixed_specs(tok, 28, seed=3)
    cancel = {k: 1 + k % 4 for k in range(0, 28, 5)}

    def core(overlap: bool) -> BatchCore:
        return BatchCore(Decoder(model, 6, deterministic=True, fixed_rows=4), tok, overlap=overlap)

    plain = drive(core(False), specs, cancel)
    overlapped = drive(core(True), specs, cancel)
    assert set(plain) == set(specs)
    for k in specs:
        assert overlapped[k] == plain[k], k
    assert {r[3] for r in plain.values()} == {"length", "stop_sequence", "eos_token", "cancelled"}

    # one step later: the first call only launches
    c = core(True)
    c.add(0, specs[0])
    assert len(c.step().keys) == 0 and len(c) == 1
    assert c.step().keys.tolist() == [0]


def test_overlap_drops_the_rows_of_a_sequence_removed_in_flight(model, tok) -> None:
    """A removed sequence's slot is free at once; a newcomer takes it while the removed row's step is still in
    flight, and gets exactly what it gets alone."""
    greedy = SamplingParams(temperature=0)
    lone = run(BatchCore(Decoder(model, 1), tok), {9: SequenceSpec(tok.encode(PROMPTS[3]), greedy, 6)})[9]
    c = BatchCore(Decoder(model, 1), tok, overlap=True)
    c.add(0, SequenceSpec(tok.encode(PROMPTS[0]), greedy, 20))
    c.step()  # launches the prefill
    assert c.step().keys.tolist() == [0]  # the prefill's token; step 2 is in flight
    assert c.remove(0) == 1 and c.free_slots == 1
    c.add(9, SequenceSpec(tok.encode(PROMPTS[3]), greedy, 6))  # the same slot
    toks: list[int] = []
    while len(c):
        out = c.step()
        assert set(out.keys.tolist()) <= {9}
        toks += out.tokens.tolist()
    assert (toks, "length") == lone


def test_overlap_failed_launch_delivers_the_tokens_in_flight_then_ends_its_rows(model, tok) -> None:
    """As without overlap: a sequence whose step fails gets every token computed before it, then its failure."""
    c = BatchCore(Decoder(model, 4), tok, overlap=True)
    greedy = SamplingParams(temperature=0)
    for k in range(2):
        c.add(k, SequenceSpec(tok.encode(PROMPTS[k]), greedy, 10))
    c.step()  # launch: prefill
    c.step()  # launch: step 2; collect: the prefill's tokens

    def fail() -> None:
        raise RuntimeError("boom")

    c.before_step = fail
    c.add(5, SequenceSpec(tok.encode(PROMPTS[2]), greedy, 10))
    out = c.step()  # launch of step 3 fails for 0 and 1 (5 is prefilled); step 2's tokens of 0 and 1 come first
    assert sorted(k for k, _ in out.failed) == [0, 1] and out.keys.tolist() == [0, 1] and not out.finished
    assert len(c) == 1 and c.free_slots == 3
    c.before_step = None
    assert c.step().keys.tolist() == [5]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_launch_never_waits_for_the_device(model, tok) -> None:
    """On CUDA a launch only queues work (the point of overlapping): behind a kernel that keeps the device busy for
    seconds, a launch that steps greedy, seeded top-k, penalty, logit-bias and top-n rows and prefills a new one
    returns while that kernel still runs; the step then collects the same results as without overlap."""
    specs = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, seed=2),
        SamplingParams(temperature=0, logit_bias={7: 5.0}, top_n_tokens=3),
    ]

    def start(overlap: bool) -> BatchCore:
        c = BatchCore(Decoder(model, 8, device="cuda", deterministic=True), tok, overlap=overlap)
        for k, p in enumerate(specs):
            c.add(k, SequenceSpec(tok.encode(PROMPTS[k]), p, 12))
        c.step()
        c.step()  # graphs captured, every row running
        c.add(9, SequenceSpec(tok.encode(PROMPTS[0]), SamplingParams(temperature=0), 12))
        return c

    c = start(True)
    assert c.overlap
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # a few seconds of device time
    busy = torch.cuda.Event()
    busy.record()
    launch = c._launch([])
    assert not busy.query(), "the launch waited for the device"
    assert launch is not None and len(launch.rows) == 5
    torch.cuda.synchronize()
    ref = start(False)
    want = ref.step()  # the same step, collected at once
    got = c._collect(launch)  # (the launch before it, still in flight, is skipped: it holds no row of these tokens)
    assert got.keys.tolist() == want.keys.tolist() and got.tokens.tolist() == want.tokens.tolist()


def collect_all(core: BatchCore) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Step the core until it is empty: key -> its tokens, key -> how it ended (finish reason or failure message)."""
    done = drive(core, failures=True)
    return {k: r[0] for k, r in done.items() if r[0]}, {k: r[3] for k, r in done.items()}


def test_overlap_remove_during_prefill_then_re_add_the_same_key(model, tok) -> None:
    """A key removed while its prefill is in flight and added again at once (same key, same slot) gets exactly what
    its new spec gets alone; no row of the first one comes out."""
    greedy = SamplingParams(temperature=0)
    second = SequenceSpec(tok.encode(PROMPTS[2]), greedy, 5)
    lone = run(BatchCore(Decoder(model, 1), tok), {0: second})[0]
    c = BatchCore(Decoder(model, 1), tok, overlap=True)
    c.add(0, SequenceSpec(tok.encode(PROMPTS[0]), greedy, 20))
    assert len(c.step().keys) == 0  # the prefill is in flight
    assert c.remove(0) == 0 and c.free_slots == 1
    c.add(0, second)
    toks, ends = collect_all(c)
    assert (toks[0], ends[0]) == lone and c.free_slots == 1


class _FailsOn:
    """A detokenizer that raises on its n-th token: a token-handling failure of one row."""

    def __init__(self, inner: Detokenizer, n: int) -> None:
        self.inner, self.n, self.seen = inner, n, 0

    def add(self, token_id: int) -> str:
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("boom")
        return self.inner.add(token_id)

    def flush(self) -> str:
        return self.inner.flush()


@pytest.mark.parametrize("n", [1, 3])
def test_overlap_token_handling_failure_ends_one_row_as_without(model, tok, n: int) -> None:
    """A row whose text step raises (on its n-th token) ends alone after the same tokens with overlap as without (its
    row still in flight is dropped); the others run on; every slot comes back."""
    greedy = SamplingParams(temperature=0)

    def ends(overlap: bool) -> tuple[dict[int, list[int]], dict[int, str]]:
        c = BatchCore(Decoder(model, 3, deterministic=True, fixed_rows=4), tok, overlap=overlap)
        for k in range(3):
            c.add(k, SequenceSpec(tok.encode(PROMPTS[k]), greedy, 8, stop=["@@@"] if k == 1 else []))
        seq = c._seqs[1]
        assert seq.texts is not None
        seq.texts = (_FailsOn(seq.texts[0], n), seq.texts[1])  # type: ignore[assignment]
        got = collect_all(c)
        assert c.free_slots == 3
        return got

    plain = ends(False)
    assert len(plain[0][1]) == n and plain[1][1].startswith("token handling failed: boom")
    assert plain[1][0] == plain[1][2] == "length"
    assert ends(True) == plain
