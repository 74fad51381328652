"""The engine core's messages: a step's output round-trips msgpack, and splitting it per frontend gives each
frontend exactly its own rows, requests and replies, with row-indexed extras re-indexed."""

from __future__ import annotations

import numpy as np

from gam_model.scoring import TokenLogprobs
from server import protocol as p


def rid(frontend: int, n: int) -> int:
    return (frontend << p.FRONTEND_SHIFT) | n


def test_split_routes_rows_and_extras_to_their_frontend() -> None:
    ids = [rid(0, 1), rid(1, 1), rid(0, 2), rid(2, 7), rid(1, 2)]
    out = p.CoreOutput(
        ids=np.array(ids, np.int64).tobytes(),
        tokens=np.array([10, 11, 12, 13, 14], np.int64).tobytes(),
        logprobs=np.array([-0.5, -1.5, -2.5, -3.5, -4.5], np.float32).tobytes(),
        finished={2: p.Finish("length", 3, None), 4: p.Finish("eos_token", 9, 42)},
        top={1: ([3, 4], [-0.1, -0.2])},
        prompts={rid(1, 1): TokenLogprobs([-1.0], [[]], [[]])},
        scored=[rid(2, 9)],
        errors=[p.Error(rid(0, 5), "timed out", 504, "timeout")],
        replies=[p.Reply(1, 7), p.Reply(0, 3, "QueueFull", "full")],
        running=4,
        waiting=1,
        free_slots=0,
    )
    out = p.decode_from_core(p.encode(out))  # what a frontend receives
    assert isinstance(out, p.CoreOutput)
    parts = out.split([0, 1, 2])
    f0, f1, f2 = parts[0], parts[1], parts[2]
    assert f0.columns() == ([rid(0, 1), rid(0, 2)], [10, 12], [-0.5, -2.5])
    assert f0.finished == {1: p.Finish("length", 3, None)} and f0.top == {}
    assert [e.id for e in f0.errors] == [rid(0, 5)] and [r.token for r in f0.replies] == [3]
    assert f1.columns() == ([rid(1, 1), rid(1, 2)], [11, 14], [-1.5, -4.5])
    assert f1.finished == {1: p.Finish("eos_token", 9, 42)} and f1.top == {0: ([3, 4], [-0.1, -0.2])}
    assert list(f1.prompts) == [rid(1, 1)] and [r.token for r in f1.replies] == [7]
    assert f2.columns() == ([rid(2, 7)], [13], [-3.5]) and f2.scored == [rid(2, 9)] and not f2.finished
    assert all((q.running, q.waiting, q.free_slots) == (4, 1, 0) for q in parts.values())
    assert out.split([0]) == {0: out}  # one frontend: the message as it is
