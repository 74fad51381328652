"""Batched sampling: warpers against Hugging Face's reference processors, penalties, greedy, seeds, invariance."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gam_model import sampling
from gam_model.sampling import (
    SamplingParams,
    SequenceSampler,
    apply_penalties,
    row_argmax,
    sample,
    truncation_mask,
)

V = 97


def rows_for(params: list[SamplingParams], prompt: list[int] | None = None) -> list[SequenceSampler]:
    return [SequenceSampler(p, prompt or [], V, "cpu") for p in params]


def logits_batch(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3  # (B, V) peaked enough for the warpers to matter


def hf_keep(warper, logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(warper(None, logits.clone()))


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_keeps_exactly_k(k):
    logits = logits_batch(4)
    keep = truncation_mask(logits, rows_for([SamplingParams(top_k=k)] * 4))
    assert keep.sum(-1).tolist() == [k] * 4
    assert torch.equal(keep, hf_keep(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_keeps_smallest_set_with_mass_p(p):
    logits = logits_batch(6, seed=1)
    keep = truncation_mask(logits, rows_for([SamplingParams(top_p=p)] * 6))
    probs = logits.softmax(-1)
    for b in range(6):
        kept = probs[b][keep[b]]
        assert kept.sum() >= p - 1e-6  # enough mass
        assert kept.sum() - kept.min() < p  # and minimal: dropping the least likely kept token falls short
        assert probs[b][~keep[b]].max() <= kept.min()  # the most likely ones
    assert torch.equal(keep, hf_keep(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9])
def test_typical_p_matches_hf(mass):
    logits = logits_batch(6, seed=2)
    keep = truncation_mask(logits, rows_for([SamplingParams(typical_p=mass)] * 6))
    assert torch.equal(keep, hf_keep(TypicalLogitsWarper(mass), logits))


def test_per_row_thresholds_and_order_top_k_then_top_p():
    logits = logits_batch(3, seed=3)
    params = [SamplingParams(top_k=10, top_p=0.5), SamplingParams(), SamplingParams(top_p=0.9, typical_p=0.8)]
    keep = truncation_mask(logits, rows_for(params))
    ref0 = hf_keep(TopPLogitsWarper(0.5), TopKLogitsWarper(10)(None, logits[:1].clone()))
    assert torch.equal(keep[0:1], ref0)
    assert keep[1].all()
    ref2 = hf_keep(TypicalLogitsWarper(0.8), TopPLogitsWarper(0.9)(None, logits[2:3].clone()))
    assert torch.equal(keep[2:3], ref2)


def test_sampled_tokens_stay_inside_the_kept_set():
    logits = logits_batch(1, seed=4).expand(200, V).contiguous()
    params = [SamplingParams(top_k=3, seed=s) for s in range(200)]
    out = sample(logits, rows_for(params))
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(out.tokens.tolist()) == allowed  # all three drawn over 200 seeds, nothing else


def test_draw_frequencies_follow_softmax():
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (V - 5))
    n = 4000
    out = sample(base.expand(n, V).contiguous(), rows_for([SamplingParams(temperature=0.8, seed=s) for s in range(n)]))
    freq = torch.bincount(out.tokens, minlength=V).float() / n
    expect = (base / 0.8).softmax(-1)
    assert (freq - expect).abs().max() < 4 * math.sqrt(0.25 / n)  # within 4 sigma of a binomial


def test_repetition_penalty_matches_hf_over_prompt_and_generated():
    logits = logits_batch(1, seed=5)
    row = SequenceSampler(SamplingParams(repetition_penalty=1.7), [3, 4, 4, 10], V)
    row.observe(20)
    got = apply_penalties(logits, [row])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 4, 4, 10, 20]]), logits.clone())
    assert torch.allclose(got, ref)
    changed = (got != logits).nonzero()[:, 1].tolist()
    assert changed == [3, 4, 10, 20]


def test_frequency_and_presence_penalties_over_generated_only():
    logits = logits_batch(2, seed=6)
    rows = rows_for([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()], [7, 8])
    for t in [1, 1, 1, 2]:
        rows[0].observe(t)
    rows[1].observe(1)
    got = apply_penalties(logits, rows)
    expect = logits.clone()
    expect[0, 1] -= 3 * 0.5 + 0.25
    expect[0, 2] -= 0.5 + 0.25
    assert torch.allclose(got, expect)  # prompt tokens 7, 8 untouched; row 1 untouched


def test_logit_bias_bans_and_forces_tokens_per_row():
    logits = logits_batch(3, seed=8)
    best = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0, logit_bias={best[0]: -100.0}),
        SamplingParams(temperature=0, logit_bias={5: 100.0}),
        SamplingParams(temperature=0),
    ]
    rows = rows_for(params, [])
    out = sample(logits, rows)
    assert (
        out.tokens[0] != best[0]
        and out.tokens[0] == logits[0].clone().index_fill(0, torch.tensor(best[0]), -1e9).argmax()
    )
    assert out.tokens[1] == 5 and out.tokens[2] == best[2]  # a row without bias is untouched
    expect = logits.clone()
    expect[0, best[0]] -= 100
    expect[1, 5] += 100
    assert torch.equal(apply_penalties(logits, rows), expect)
    with pytest.raises(ValueError, match="vocabulary size"):
        SequenceSampler(SamplingParams(logit_bias={logits.shape[1]: 1.0}), [], logits.shape[1])


def test_greedy_is_argmax_of_penalised_logits():
    logits = logits_batch(4, seed=7)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(do_sample=False),
        SamplingParams(temperature=0, repetition_penalty=5.0),
        SamplingParams(temperature=0, top_k=2),
    ]
    rows = rows_for(params, prompt=[int(logits[2].argmax())])
    out = sample(logits, rows)
    assert out.tokens[[0, 1, 3]].tolist() == logits[[0, 1, 3]].argmax(-1).tolist()
    assert out.tokens[2] == apply_penalties(logits, rows)[2].argmax() != logits[2].argmax()


@pytest.mark.parametrize("V", [8192, 10000, 50257, 130, 64, 63])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_row_argmax_is_argmax(V: int, rows: int):
    """The blocked argmax gives torch's indices: the first of tied maxima (within a block, across blocks, in the tail
    past the last whole block), NaN as the maximum, infinities, bf16 rows full of ties."""
    g = torch.Generator().manual_seed(V + rows)
    x = torch.randn(rows, V, generator=g)
    cases = [x, x.round(), x.bfloat16(), torch.full((rows, V), -math.inf), torch.zeros(rows, V)]
    for cols in ([V - 1], [0, V - 1], [V // 2, V - 1], [63, 64], [V // 3]):
        for value in (math.nan, math.inf):
            y = x.clone()
            y[:, [c for c in cols if c < V]] = value
            cases.append(y)
    y = x.clone()
    y[0, V - 1] = x[0].max() + 1  # one row's maximum in the tail, the others' not
    cases.append(y)
    for c in cases:
        assert torch.equal(row_argmax(c), c.argmax(dim=-1))


def test_do_sample_false_with_a_warper_samples_like_tgi():
    assert SamplingParams(do_sample=False).greedy
    assert not SamplingParams(do_sample=False, temperature=0.5).greedy
    assert SamplingParams(do_sample=True, temperature=0).greedy


def test_logprobs_are_log_softmax_after_penalties_and_temperature():
    logits = logits_batch(3, seed=8)
    params = [
        SamplingParams(temperature=0.7, top_p=0.8, seed=1, top_n_tokens=4),
        SamplingParams(temperature=0, top_n_tokens=2),
        SamplingParams(temperature=1.3, frequency_penalty=1.0, seed=2),
    ]
    rows = rows_for(params)
    rows[2].observe(int(logits[2].argmax()))
    out = sample(logits, rows)
    temps = torch.tensor([[0.7], [1.0], [1.3]])
    ref = (apply_penalties(logits, rows) / temps).log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.tokens[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 4)  # N = max top_n_tokens in the batch
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])  # sorted, best first
    assert torch.allclose(out.top_logprobs, ref.gather(1, out.top_ids))
    assert out.top_ids[1, 0] == out.tokens[1]  # greedy: the best alternative is the chosen token


@pytest.mark.parametrize("temperature", [1e-300, 5e-46, 1e-45, 1e-39, 1e-30])
@pytest.mark.parametrize("warper", [{}, {"top_k": 3}, {"top_p": 0.5}, {"typical_p": 0.5}])
def test_a_tiny_temperature_samples_the_argmax(temperature: float, warper: dict):
    """The limit of temperature -> 0 is the argmax with logprob 0, however small the (accepted) temperature: logits /
    1e-39 overflow to +-inf, whose softmax was NaN, and the draw then took the last vocabulary id; a temperature
    below float32's smallest subnormal (1e-300, 5e-46) is 0 in float32, and 0 / 0 was NaN too."""
    logits = logits_batch(4, seed=13)
    out = sample(
        logits, rows_for([SamplingParams(temperature=temperature, seed=s, top_n_tokens=2, **warper) for s in range(4)])
    )
    assert out.tokens.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs.tolist() == [0.0] * 4
    assert out.top_ids[:, 0].tolist() == out.tokens.tolist() and bool((out.top_logprobs[:, 1] < -1e20).all())


@pytest.mark.parametrize("temperature", [1e-39, 1e-42, 1e-45])
def test_a_subnormal_temperature_is_divided_by_as_it_is(temperature: float):
    """A temperature float32 holds only as a subnormal (1e-39, 1e-45: not 0) is the row's temperature, as any other:
    the clamp for those that are 0 in float32 must not raise it to the smallest normal float32 (1.2e-38), which
    reported finite logprobs near -1e38 for alternatives whose logit / temperature is -inf."""
    logits = logits_batch(2, seed=15)
    out = sample(logits, rows_for([SamplingParams(temperature=temperature, seed=s, top_n_tokens=5) for s in range(2)]))
    t = torch.tensor(temperature)  # float32, > 0
    assert t > 0
    ref = ((logits - logits.amax(-1, keepdim=True)) / t).log_softmax(-1)
    assert torch.equal(out.top_logprobs, ref.gather(1, out.top_ids))


@pytest.mark.parametrize("penalty", [1e-300, 1e-40])
def test_a_tiny_repetition_penalty_picks_a_seen_token(penalty: float):
    """A repetition penalty -> 0 boosts the seen tokens with a positive logit without bound: one of them is chosen,
    with a finite logprob (logits / 1e-40 overflowed to +inf, softmax gave NaN and the draw the last vocabulary id)."""
    logits = logits_batch(1, seed=14).expand(2, V).contiguous()
    seen = [int(logits[0].argsort()[-3]), int(logits[0].argsort()[-2]), int(logits[0].argmin())]
    params = [
        SamplingParams(repetition_penalty=penalty, seed=1, temperature=0.8),
        SamplingParams(repetition_penalty=penalty, temperature=0),
    ]
    out = sample(logits, rows_for(params, seen))
    assert set(out.tokens.tolist()) <= set(seen[:2]) and bool(out.logprobs.isfinite().all())


@pytest.mark.parametrize("wide", [False, True], ids=["ties-within-topk-room", "ties-past-it"])
def test_top_n_ties_go_to_the_lower_id_whatever_the_batch_asks(wide: bool):
    """Alternatives with exactly equal logprobs (common with bf16 logits) come best first and, among equals, lower id
    first, so a row's top-n does not depend on the top_n_tokens of the rows beside it: the batch's topk ran to the
    largest top_n of the batch, and torch.topk keeps and orders tied entries differently for different k."""
    vocab = 8192
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))  # (1, V)
    best = list(range(5, 8000, 8000 // (sampling.TIE_ROOM + 8))) if wide else [5, 700, 3000, 8000]
    logits[0, best] = 10.0  # these tie for the best, three more for the next
    logits[0, [100, 4000, 6000]] = 9.0
    want = [*best, 100, 4000, 6000][:6]
    for n in range(1, 7):
        for asked in (n, 6):  # alone, or beside a row that asks for more alternatives
            params = [SamplingParams(temperature=0, top_n_tokens=n), SamplingParams(temperature=0, top_n_tokens=asked)]
            out = sample(logits.expand(2, vocab), [SequenceSampler(p, [], vocab, "cpu") for p in params])
            assert out.top_ids[0, :n].tolist() == want[:n], (n, asked)
            assert out.tokens[0] == out.top_ids[0, 0] == 5  # the greedy choice is the first alternative


def test_no_top_n_gives_empty_alternatives():
    out = sample(logits_batch(2), rows_for([SamplingParams(seed=1), SamplingParams(temperature=0)]))
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)


def run_rows(rows: list[SequenceSampler], steps: int, table: torch.Tensor) -> list[list[int]]:
    """A toy autoregressive loop: next logits = table[last token]; returns each row's tokens."""
    last = [0] * len(rows)
    toks: list[list[int]] = [[] for _ in rows]
    for _ in range(steps):
        out = sample(table[torch.tensor(last)], rows)
        for i, t in enumerate(out.tokens.tolist()):
            rows[i].observe(t)
            toks[i].append(t)
            last[i] = t
    return toks


def test_seeded_row_reproduces_and_unseeded_records_its_seed():
    table = logits_batch(V, seed=9)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    a = run_rows(rows_for([p]), 30, table)
    b = run_rows(rows_for([p]), 30, table)
    assert a == b
    row = rows_for([SamplingParams()])[0]
    replay = rows_for([SamplingParams(seed=row.seed)])
    assert run_rows([row], 30, table) == run_rows(replay, 30, table)


def test_batch_invariance_over_30_steps():
    table = logits_batch(V, seed=10)
    target = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=77)
    alone = run_rows(rows_for([target]), 30, table)[0]
    neighbours = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5, seed=3, top_n_tokens=5),
        SamplingParams(typical_p=0.5, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(top_k=1, seed=4),
    ]
    for pos in (0, 2, 4):
        params = [*neighbours[:pos], target, *neighbours[pos:]]
        assert run_rows(rows_for(params), 30, table)[pos] == alone
    assert len(set(alone)) > 3  # it really sampled


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_p=float("nan")),
        dict(typical_p=0.0),
        dict(typical_p=2.0),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(frequency_penalty=2.5),
        dict(presence_penalty=-3.0),
        dict(seed=-1),
        dict(seed=2**64),
        dict(top_n_tokens=-1),
        dict(do_sample="yes"),
        dict(temperature=True),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={3: 101.0}),
        dict(logit_bias={3: float("nan")}),
    ],
)
def test_validate_rejects(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad).validate()


def test_validate_accepts_defaults_and_edges():
    for ok in [
        SamplingParams(),
        SamplingParams(temperature=0, top_p=1.0, typical_p=1.0, seed=0, top_k=0),
        SamplingParams(frequency_penalty=-2.0, presence_penalty=2.0, seed=2**63 - 1),
    ]:
        ok.validate()


@pytest.mark.parametrize("head", [4, 16, 1000])
def test_top_p_head_and_full_sort_paths_agree(monkeypatch, head):
    """Rows whose head holds < p fall back to a full sort; either way the kept set is HF's."""
    monkeypatch.setattr(sampling, "TOP_P_HEAD", head)
    peaked, flat = logits_batch(3, seed=11) * 4, logits_batch(3, seed=12) * 0.2
    logits = torch.cat([peaked, flat])  # (6, V): mixed coverage
    for p in (0.5, 0.9):
        keep = truncation_mask(logits, rows_for([SamplingParams(top_p=p)] * 6))
        assert torch.equal(keep, hf_keep(TopPLogitsWarper(p), logits))
        for i in range(6):  # each row alone gives the same mask as in the mixed batch
            assert torch.equal(truncation_mask(logits[i : i + 1], rows_for([SamplingParams(top_p=p)]))[0], keep[i])


def test_sparse_logit_bias_equals_a_dense_bias_row_bit_for_bit():
    """The bias is added at its entries only; the result is exactly logits + a dense bias row (zero elsewhere)."""
    gen = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(6, V, generator=gen) * 5
    biases = [{3: -100.0, 7: 2.5}, None, {0: 0.125}, {49: 100.0, 1: -0.5, 2: 3.0}, None, {3: 1e-3}]
    rows = [SequenceSampler(SamplingParams(logit_bias=b), [], V) for b in biases]
    dense = torch.zeros(6, V)
    for i, b in enumerate(biases):
        for t, v in (b or {}).items():
            dense[i, t] = v
    assert torch.equal(apply_penalties(logits, rows), logits + dense)
