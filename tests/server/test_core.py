"""EngineCore driven directly (no process, no HTTP): queue deadlines."""

from __future__ import annotations

import time

import pytest
import torch

from gam_model.decode import Decoder
from gam_model.sampling import SamplingParams
from server.core import EngineCore, RequestStats, ScoreBudget
from server.protocol import GenerationRequest
from tests.conftest import tiny_model
from tests.gam_model.tokenizers_for_tests import byte_bpe


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=5, vocab_size=tok.vocab_size, block_size=24)


def test_a_queued_request_ends_at_its_deadline_while_the_slots_stay_busy(model, tok) -> None:
    """One slot, held by a long request; a second request waits behind it. Its deadline passes while it waits: the next
    iteration ends it with the queue timeout (504), though no slot has come free (it was checked only when a slot
    did, so a client waited on past its deadline for as long as the running request took)."""
    core = EngineCore(Decoder(model, 1, deterministic=True), tok, max_queue=4, score_budget=ScoreBudget(1.0, 32, 64))
    stats: list[RequestStats] = []
    core.on_request = stats.append
    now = time.monotonic()
    prompt = tok.encode("The game")
    assert tok.eos_token_id is not None
    # greedy with eos biased out: it cannot end (random sampling could draw eos and free the slot)
    never_ends = SamplingParams(do_sample=False, logit_bias={tok.eos_token_id: -100.0})
    long = GenerationRequest(prompt, never_ends, 10**6)
    core.submit([1], [long], now, now + 600)
    core.iteration()
    assert core.take_output() is not None and core.num_running == 1
    late = GenerationRequest(prompt, SamplingParams(), 4)
    core.submit([2], [late], now, now)  # its deadline is past at the next iteration
    core.submit([3], [late], now, now + 600)
    core.iteration()
    out = core.take_output()
    assert out is not None
    assert [(e.id, e.status, e.kind) for e in out.errors] == [(2, 504, "timeout")]
    assert "in the queue" in out.errors[0].message
    assert list(out.columns()[0]) == [1]  # the running request goes on
    assert core.num_running == 1 and core.num_waiting == 1 and core._waiting[0].id == 3
    assert [(s.finish_reason, s.generated_tokens, s.queue_s) for s in stats] == [("error", 0, None)]
    for _ in range(3):  # the next deadline is request 3's again (600 s away): nothing else ends
        core.iteration()
        out = core.take_output()
        assert out is not None and not out.errors
    assert core.num_waiting == 1


def test_prompt_logprobs_are_scored_on_every_thread_after_a_small_step(model, tok, monkeypatch) -> None:
    """A tuned CPU decoder (Decoder.tune_threads) runs small steps on one torch thread; the core's prompt scoring
    (O(prompt) window batches, like a prefill) runs between steps and must not inherit that one thread."""
    from gam_model.scoring import PromptScorer

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dec = Decoder(model, 2)
        dec.one_thread_rows = 1  # as tune_threads would set it
        core = EngineCore(dec, tok, max_queue=4, score_budget=ScoreBudget(1.0, 32, 64))
        seen: list[int] = []
        advance = PromptScorer.advance

        def counting(self: PromptScorer) -> int:
            seen.append(torch.get_num_threads())
            return advance(self)

        monkeypatch.setattr(PromptScorer, "advance", counting)
        now = time.monotonic()
        greedy = SamplingParams(do_sample=False)
        core.submit([1], [GenerationRequest(tok.encode("The game"), greedy, 50)], now, now + 600)
        core.iteration()  # prefill
        core.iteration()  # a one-row step: one thread
        assert torch.get_num_threads() == 1
        scored = GenerationRequest(tok.encode("The game was released in Japan"), greedy, 0, prompt_logprobs=1)
        core.submit([2], [scored], now, now + 600)
        for _ in range(10):
            core.iteration()
            out = core.take_output()
            if out is not None and 2 in out.scored:
                break
        else:
            raise AssertionError("request 2 was never scored")
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)
