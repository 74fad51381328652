"""Decoder(deterministic=True): a row's logits, and so its greedy and seeded tokens, are bit-identical whatever
else is in the batch (its size, the other rows' prompts and positions, the row's place), for prefill, the cached
and the sliding-window step, in fp32 and bf16, with 1 and 2 threads. Compared with torch.equal, never a tolerance.

The default mode is not checked for the opposite: whether a batch changes the last bits is up to BLAS, so such
a test could not be relied on to fail or to pass (the measured differences are in the README).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gam_model import sampling
from gam_model.checkpoint import load_checkpoint
from gam_model.decode import CPU_FIXED_ROWS, Decoder, FixedShapeHead
from gam_model.model import GAM
from gam_model.sampling import SamplingParams, SequenceSampler, sample
from gam_model.step import StepWeights
from tests.conftest import tiny_model
from tests.gam_model.test_decode import TOL, teacher_force

ROOT = Path(__file__).resolve().parent.parent.parent
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BUNDLED = ROOT / "weights" / "gam-wikitext2"
TEXT = ROOT / "tests" / "fixtures" / "wikitext2_train_excerpt.txt"

# greedy rows and seeded sampling rows with every warper; prompt i samples with PARAMS[i % len(PARAMS)]
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=12, top_n_tokens=3),
    SamplingParams(temperature=1.2, typical_p=0.8, repetition_penalty=1.3, seed=13),
    SamplingParams(temperature=0.7, top_p=0.5, frequency_penalty=0.5, presence_penalty=0.3, seed=14),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread unless a test asks for more: on a shared 2-core machine a second OpenMP thread that is
    descheduled stalls every parallel region (20-60 s for tests that take 1-5 s on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> int:
    """Run the test with this many torch threads (BLAS and elementwise kernels split work by it)."""
    torch.set_num_threads(request.param)
    return request.param


@dataclass
class Trace:
    """One sequence's run: logits of prefill and every step (T, V), the tokens and logprobs drawn from them."""

    logits: torch.Tensor
    tokens: list[int]
    logprobs: torch.Tensor
    top_logprobs: torch.Tensor


def generate(dec: Decoder, prompts: Sequence[Sequence[int]], params: Sequence[int], steps: int) -> list[Trace]:
    """Prefill the prompts together, then sample (row i with PARAMS[params[i]]) and step them together `steps`
    times; one Trace per prompt."""
    V = dec.config.vocab_size
    slots = [dec.allocate() for _ in prompts]
    rows = [
        SequenceSampler(PARAMS[k % len(PARAMS)], list(p), V, dec.device) for k, p in zip(params, prompts, strict=True)
    ]
    logits = dec.prefill(slots, prompts)  # (B, V)
    seen: list[list] = [[] for _ in prompts]
    for t in range(steps + 1):
        out = sample(logits, rows)
        for i, r in enumerate(rows):
            r.observe(int(out.tokens[i]))
            seen[i].append(
                (logits[i], int(out.tokens[i]), out.logprobs[i], out.top_logprobs[i, : r.params.top_n_tokens])
            )
        if t < steps:
            logits = dec.step(slots, out.tokens)
    for s in slots:
        dec.free(s)
    return [
        Trace(torch.stack([x[0] for x in r]), [x[1] for x in r], torch.stack([x[2] for x in r]),
              torch.stack([x[3] for x in r]))
        for r in seen
    ]  # fmt: skip


def assert_identical(got: Trace, alone: Trace, what: str) -> None:
    assert torch.equal(got.logits, alone.logits), (
        f"{what}: logits differ (max {(got.logits - alone.logits).abs().max()})"
    )
    assert got.tokens == alone.tokens, what
    assert torch.equal(got.logprobs, alone.logprobs) and torch.equal(got.top_logprobs, alone.top_logprobs), what


def check_invariance(dec: Decoder, prompts: list[list[int]], makeups: list[list[int]], steps: int) -> None:
    """Each prompt alone vs in every make-up (lists of prompt indices: order = place in the batch)."""
    alone = [generate(dec, [p], [i], steps)[0] for i, p in enumerate(prompts)]
    for mk in makeups:
        for place, (i, got) in enumerate(zip(mk, generate(dec, [prompts[i] for i in mk], mk, steps), strict=True)):
            assert_identical(got, alone[i], f"prompt {i} at place {place} of {mk}")


# -- the bundled model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_once() -> tuple[GAM, list[int]]:
    model, tok, _ = load_checkpoint(BUNDLED)
    return model, tok.encode(TEXT.read_text())


@pytest.fixture
def bundled(bundled_once: tuple[GAM, list[int]]) -> tuple[GAM, list[int]]:
    """A fresh copy of the bundled model per test: Decoder moves its model to its device and dtype in place."""
    model, ids = bundled_once
    return copy.deepcopy(model), ids


def bundled_prompts(ids: list[int], block_size: int) -> list[list[int]]:
    """Real text of mixed lengths: 1 token, < R, = R, > R, a few hundred, and past block_size (sliding regime)."""
    lengths = [1, 5, 9, 10, 37, 300, block_size + 40]
    return [ids[97 * i : 97 * i + n] for i, n in enumerate(lengths)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bundled_model_rows_are_bit_identical_whatever_the_batch(bundled, dtype: torch.dtype) -> None:
    """One thread (see one_thread): two threads pass too, but take 20-50 s on the shared development machine; the
    tiny-model tests cover the thread split."""
    model, ids = bundled
    dec = Decoder(model, num_slots=2 * CPU_FIXED_ROWS, device="cpu", dtype=dtype, deterministic=True)
    assert dec.fixed_rows == CPU_FIXED_ROWS
    prompts = bundled_prompts(ids, dec.config.block_size)
    n = len(prompts)
    makeups = [
        list(range(n)),  # one chunk, mixed cached and sliding rows
        [2, 6, 0, 3, 1, 4, 5, 1, 0, 2, 3],  # two chunks: places shift, some prompts twice, across the boundary
        [5, 0],
    ]
    check_invariance(dec, prompts, makeups, steps=3)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_rows_are_bit_identical_whatever_the_batch(bundled, dtype: torch.dtype) -> None:
    """CUDA: fixed_rows is the whole pool (one captured graph per regime, Triton kernels when importable). A pool
    of 256 spans several GEMM tiles, and the 256-row make-up puts every prompt at places all over it."""
    model, ids = bundled
    dec = Decoder(model, num_slots=256, device="cuda", dtype=dtype, deterministic=True)
    assert dec.fixed_rows == 256 and dec.buckets == [256] and dec.cuda_graphs
    prompts = bundled_prompts(ids, dec.config.block_size)
    n = len(prompts)
    makeups = [list(range(n)), [(5 * j + j // n) % n for j in range(256)], [4, 1]]
    check_invariance(dec, prompts, makeups, steps=3)


# -- tiny model: the sliding-window regime and mixed batches -------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "cuda_graphs", "threads"),
    [(torch.float32, False, 1), (torch.bfloat16, True, 1), (torch.float32, True, 2), (torch.bfloat16, False, 2)],
    ids=["fp32-eager-threads1", "bf16-graphs-threads1", "fp32-graphs-threads2", "bf16-eager-threads2"],
    indirect=["threads"],
)
def test_sliding_and_mixed_batches_are_bit_identical(dtype: torch.dtype, cuda_graphs: bool, threads: int) -> None:
    """Prompts before, at and past block_size; over 6 steps rows cross it at different times, so batches mix the
    cached and the sliding step. cuda_graphs=True runs the graph runner's CPU stand-in (one bucket of fixed_rows).
    fixed_rows is a multiple of 4: MKL's fp32 GEMM on the development CPU gives a row different bits at different
    places of a 2-3 row (1 thread, one shape) or 5-7, 9-11 row (2 threads) batch, never at multiples of 4."""
    model = tiny_model(seed=4, block_size=32)
    bs = model.config.block_size
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 4, bs - 3, bs - 1, bs, bs + 9, 3 * bs)]
    dec = Decoder(model, num_slots=8, dtype=dtype, cuda_graphs=cuda_graphs, deterministic=True, fixed_rows=4)
    makeups = [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0, 2], [3, 0], [2, 5, 1, 6]]
    check_invariance(dec, prompts, makeups, steps=6)


def test_padding_rows_do_not_matter() -> None:
    """The chunk's padding rows read the scratch slot: garbage there changes nothing in the real rows."""
    model = tiny_model(seed=5)
    dec = Decoder(model, num_slots=6, deterministic=True, fixed_rows=4)
    slots = [dec.allocate() for _ in range(2)]
    dec.prefill(slots, [[1, 2, 3], [4] * 40])  # one cached row, one sliding row
    snap = (dec.state.conv.clone(), dec.state.window.clone(), dec.state.pos.clone())
    tokens = torch.tensor([7, 8])
    clean = dec.step(slots, tokens)
    st, sc, g = dec.state, dec.state.scratch, torch.Generator().manual_seed(0)
    for garbage_pos in (0, 5, 10_000):
        st.conv.copy_(snap[0]), st.window.copy_(snap[1]), st.pos.copy_(snap[2])
        st.conv[:, sc] = torch.randn(st.conv[:, sc].shape, generator=g) * 50
        st.window[sc] = torch.randint(0, 97, (st.window.shape[1],), generator=g)
        st.pos[sc] = garbage_pos
        st.lengths[slots] -= 1  # undo the host mirror's advance of the last step
        assert torch.equal(dec.step(slots, tokens), clean)


def test_every_forward_runs_at_one_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill and the sliding step always push (fixed_rows, R) windows; the cached step one (fixed_rows,) bucket;
    the head (on CPU after the chunks, FixedShapeHead) (fixed_rows, C) @ (C, tile) GEMMs, one tile width."""
    model = tiny_model(seed=6)
    R, bs, C = model.config.receptive_field, model.config.block_size, model.config.n_embd
    dec = Decoder(model, num_slots=7, deterministic=True, fixed_rows=3)
    assert dec._head is not None
    windows, steps, heads = [], [], []
    real_window, real_math = model.window_hidden, dec._math
    monkeypatch.setattr(model, "window_hidden", lambda idx, *a: windows.append(idx.shape) or real_window(idx, *a))
    monkeypatch.setattr(dec, "_math", lambda tokens, *a: steps.append(tokens.shape) or real_math(tokens, *a))
    dec._head.tiles = [lambda x, p=p: heads.append(x.shape) or p(x) for p in dec._head.tiles]
    slots = [dec.allocate() for _ in range(7)]
    dec.prefill(slots, [[1] * n for n in (1, 2, 3, 20, bs + 1, 5, 2)])
    for _ in range(3):
        dec.step(slots, torch.arange(7))
    assert dec.buckets == [3] and set(windows) == {(3, R)} and set(steps) == {(3,)} and set(heads) == {(3, C)}
    assert len(windows) == 3 + 3 * 1 and len(steps) == 3 * 2  # chunks: prefill 3; per step 2 cached + 1 sliding
    assert len(heads) == 4 * 3  # prefill and 3 steps, each 7 rows in 3 chunks (one tile: a vocabulary of 97)


def test_fixed_shape_head_rows_are_bit_identical_whatever_the_rows() -> None:
    """FixedShapeHead over several tiles (the last narrower): a row's logits alone == among others, at any place,
    and within fp32 tolerance of the untiled head."""
    model = tiny_model(seed=8)
    w = StepWeights.from_model(model, contiguous=True)
    V, C = model.config.vocab_size, model.config.n_embd
    head = FixedShapeHead(w.head, V, rows=4, tile=16, dtype=torch.float32)
    assert [p.wt.shape[1] for p in head.tiles if p.wt is not None] == [16] * 6 + [1]
    assert all(p.wt is not None and p.wt.is_contiguous() for p in head.tiles)  # the layout of w.head.wt
    view = FixedShapeHead(StepWeights.from_model(model).head, V, rows=4, tile=16, dtype=torch.float32)
    assert all(p.wt is not None and p.wt.t().is_contiguous() for p in view.tiles)  # a transposed view stays one
    h = torch.randn(11, C, generator=torch.Generator().manual_seed(8))  # (11, C)
    batch = head(h)  # (11, V)
    assert batch.shape == (11, V) and torch.allclose(batch, w.head(h), atol=1e-5)
    for i in range(11):
        assert torch.equal(head(h[i : i + 1]), batch[i : i + 1])
        assert torch.equal(head(torch.cat([h[:3], h[i : i + 1]]))[3], batch[i])


def test_deterministic_mode_stays_exact() -> None:
    """Padding to the full window and to fixed_rows changes nothing in the semantics (DESIGN 1.2-1.3)."""
    model = tiny_model(seed=7)
    R, bs = model.config.receptive_field, model.config.block_size
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(0, 97, (bs + 20,), generator=g).tolist()
    for plen in (1, R - 1, R + 2, bs + 5):
        dec = Decoder(model, num_slots=4, deterministic=True)
        assert teacher_force(model, seq, plen, dec) <= TOL


def test_options() -> None:
    model = tiny_model()
    assert Decoder(model, num_slots=32, deterministic=True).buckets == [CPU_FIXED_ROWS]
    small = Decoder(model, num_slots=3, deterministic=True)  # rows past the pool: the scratch slot
    assert small.fixed_rows == CPU_FIXED_ROWS
    slots = [small.allocate() for _ in range(3)]
    assert small.prefill(slots, [[1], [2, 3], [4] * 9]).shape == (3, 97)
    assert small.step(slots, torch.tensor([5, 6, 7])).shape == (3, 97)
    assert Decoder(model, num_slots=32).fixed_rows is None and not Decoder(model, num_slots=32).deterministic
    with pytest.raises(ValueError, match="deterministic=True"):
        Decoder(model, num_slots=4, fixed_rows=2)
    with pytest.raises(ValueError, match="fixed_rows must be"):
        Decoder(model, num_slots=4, deterministic=True, fixed_rows=0)


# -- the sampler ---------------------------------------------------------------------------------------------------


SAMPLER_CASES = [
    (8192, 1, "cpu"),
    (50_000, 2, "cpu"),
    pytest.param(50_000, 1, "cuda", marks=[pytest.mark.cuda, cuda_only]),
]


@pytest.mark.parametrize(("vocab", "threads", "device"), SAMPLER_CASES, indirect=["threads"])
def test_sampler_rows_are_bit_identical_whatever_the_batch(vocab: int, threads: int, device: str) -> None:
    """Tokens, logprobs and alternatives of a row alone == in batches of other sizes and neighbours. With a large
    vocabulary and 2 threads torch.logsumexp / sum of a lone row split it across threads: the sampler avoids them."""
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(9, vocab, generator=g) * 4).to(device)  # (B, V)

    def rows(ks: list[int]) -> list[SequenceSampler]:
        return [SequenceSampler(PARAMS[k], [1, 2, 3], vocab, device) for k in ks]

    for target in range(len(PARAMS)):
        alone = sample(logits[target : target + 1], rows([target]))
        for others in ([0, 1], [4, 3, 2, 1, 0, 2, 3, 4]):
            ks = [*others[:1], target, *others[1:]]  # the target row at place 1
            sel = [(5 + j) % 9 for j in range(len(ks))]
            sel[1] = target
            out = sample(logits[sel], rows(ks))
            assert int(out.tokens[1]) == int(alone.tokens[0])
            assert torch.equal(out.logprobs[1], alone.logprobs[0])
            n = alone.top_logprobs.shape[1]
            assert torch.equal(out.top_logprobs[1, :n], alone.top_logprobs[0])


@pytest.mark.parametrize(("vocab", "threads", "device"), SAMPLER_CASES, indirect=["threads"])
def test_row_reductions_are_row_invariant_and_equal_torch_within_rounding(
    vocab: int, threads: int, device: str
) -> None:
    """The sampler's sums, prefix sums and normalisers of a row alone == in a batch, bit for bit. (With 2 threads
    torch's own sum and logsumexp of a lone 50,000-wide row split it across threads, here; on CUDA the reduce
    kernel's block shape follows the number of rows, and a lone row is scanned by another algorithm.)"""
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=g) * 5).to(device)  # (B, V)
    for f in (sampling.row_sum, sampling.row_logsumexp, sampling.row_cumsum, lambda t: sampling.row_cumsum(t.double())):
        batch = f(x)
        for i in range(6):
            assert torch.equal(f(x[i : i + 1]), batch[i : i + 1])
    assert torch.allclose(sampling.row_logsumexp(x), x.logsumexp(-1, keepdim=True), atol=1e-5)
    assert torch.allclose(sampling.row_sum(x), x.double().sum(-1, keepdim=True).float(), rtol=1e-4, atol=1e-2)
    assert torch.equal(sampling.row_cumsum(x), x.cumsum(-1))
