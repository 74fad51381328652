"""EngineCore with the overlap scheduler (gam_model/batch.py) against without it, driven directly: each request gets
the same events (tokens, logprobs, top-n, prompt logprobs with its first token, finish or error) and the same stats,
through cancellations, deadlines and failed steps; no slot leaks."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from gam_model.decode import Decoder
from gam_model.sampling import SamplingParams
from server.core import EngineCore, RequestStats, ScoreBudget
from server.protocol import GenerationRequest
from tests.conftest import tiny_model
from tests.gam_model.test_batch import mixed_specs
from tests.gam_model.test_generate import PROMPTS
from tests.gam_model.tokenizers_for_tests import byte_bpe

SLOTS = 4


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=5, vocab_size=tok.vocab_size, block_size=24)


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


def drive(
    model, tok, overlap: bool, reqs: list[GenerationRequest], fault: str | None = None, stop_at: dict | None = None
) -> tuple[dict[int, list[tuple]], list[tuple]]:
    """Run the requests to the end: id -> its events in order, and the request stats. stop_at[id] = (n, how): once
    the request has n tokens, the client cancels it ("cancel") or its deadline passes ("expire")."""
    core = EngineCore(
        Decoder(model, SLOTS, deterministic=True, fixed_rows=4),
        tok,
        max_queue=64,
        fault_injection=fault,
        score_budget=ScoreBudget(1.0, 32, 64),
        overlap=overlap,
    )
    stats: list[RequestStats] = []
    core.on_request = stats.append
    events: dict[int, list[tuple]] = {i: [] for i in range(len(reqs))}
    ended: set[int] = set()
    now = time.monotonic()
    core.submit(list(range(len(reqs))), reqs, now, now + 600)
    for _ in range(1000):
        if not core.has_work:
            break
        core.iteration()
        out = core.take_output()
        if out is None:
            continue
        for row, (i, t, lp) in enumerate(zip(*out.columns(), strict=True)):
            assert i not in ended, f"a token for {i} after it ended"
            fin = out.finished.get(row)
            prompt: Any = out.prompts.get(i)
            events[i].append(
                (
                    "token",
                    t,
                    lp,
                    out.top.get(row),
                    prompt and prompt.logprobs,
                    fin and (fin.reason, fin.generated, fin.seed),
                )
            )
            if fin is not None:
                ended.add(i)
        for i in out.scored:
            events[i].append(("scored",))
            ended.add(i)
        for e in out.errors:
            assert e.id not in ended, f"an error for {e.id} after it ended"
            events[e.id].append(("error", e.status, e.kind))
            ended.add(e.id)
        for i, (n, how) in (stop_at or {}).items():
            if i not in ended and sum(ev[0] == "token" for ev in events[i]) == n:
                if how == "cancel":
                    core.cancel([i])
                    events[i].append(("cancelled",))
                    ended.add(i)
                else:  # its deadline passes: the next iteration ends it
                    for r in [*core._running.values(), *core._scoring]:
                        if r.id == i:
                            r.deadline = 0.0
                    core._next_deadline = 0.0
    assert not core.has_work and ended == set(events)
    assert core.batch.free_slots == SLOTS and len(core.batch) == 0 and not core._running
    return events, sorted((s.endpoint, s.finish_reason, s.generated_tokens, s.ttft_s is None) for s in stats)


def test_a_failed_step_after_the_first_token_delivers_the_prompt_logprobs_with_it(model, tok) -> None:
    """With overlap the first decode step is launched before the prefill's tokens are collected; when it fails, each
    request still gets its first token with its prompt logprobs, then the error, and its stats count the first token's
    time, as without overlap."""
    greedy = SamplingParams(temperature=0)
    reqs = [GenerationRequest(tok.encode(PROMPTS[k]), greedy, 8, endpoint=str(k), prompt_logprobs=2) for k in range(3)]
    plain = drive(model, tok, False, reqs, fault="step:1")
    for events in plain[0].values():
        assert [e[0] for e in events] == ["token", "error"] and events[0][4] is not None
    assert all(not no_ttft for *_, no_ttft in plain[1])
    assert drive(model, tok, True, reqs, fault="step:1") == plain


@pytest.mark.parametrize("seed", range(6))
def test_overlap_gives_every_request_the_same_events_and_stats(model, tok, seed: int) -> None:
    """Mixed rows (every sampling and stop kind, prompt logprobs, max_new_tokens 0, 1 and more), more requests than
    slots, cancellations and deadlines after the n-th token: the same events and stats with overlap as without."""
    rng = random.Random(seed)
    reqs = [
        GenerationRequest(
            s.prompt_ids,
            s.params,
            rng.choice([0, 1, 1, 2, 5, s.max_new_tokens]),
            s.stop,
            s.stop_token_ids,
            endpoint=str(k),
            prompt_logprobs=rng.choice([None, None, 0, 2]),
        )
        for k, s in mixed_specs(tok, 14, seed).items()
    ]
    stop_at = {i: (rng.choice([1, 2, 3]), rng.choice(["cancel", "expire"])) for i in rng.sample(range(14), 6)}
    plain = drive(model, tok, False, reqs, stop_at=stop_at)
    assert drive(model, tok, True, reqs, stop_at=stop_at) == plain
