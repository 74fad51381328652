"""Per-bucket graph capture: the CPU stand-in runs the same bookkeeping as CUDA graphs; CUDA tests when present."""

from __future__ import annotations

import pytest
import torch

from gam_model.decode import Decoder
from gam_model.graphs import ReplayGraph
from tests.conftest import tiny_model
from tests.gam_model.test_decode import reference_logits, teacher_force

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def snapshot(dec: Decoder, slots: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    st = dec.state
    return [(st.conv[:, s].clone(), st.window[s].clone(), st.pos[s].clone()) for s in slots]


def same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(torch.equal(x, y) for ta, tb in zip(a, b, strict=True) for x, y in zip(ta, tb, strict=True))


def prefilled(cuda_graphs: bool, num_slots: int = 8, n: int = 6, seed: int = 0) -> tuple[Decoder, list[int], list]:
    """A decoder with n slots prefilled at different positions (some past block_size) and their sequences."""
    dec = Decoder(tiny_model(), num_slots=num_slots, cuda_graphs=cuda_graphs)
    bs = dec.config.block_size
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 97, (bs + 20,), generator=g).tolist() for _ in range(n)]
    plens = [1, 4, 9, bs - 3, bs, bs + 2][:n]
    slots = [dec.allocate() for _ in range(n)]
    dec.prefill(slots, [s[:p] for s, p in zip(seqs, plens, strict=True)])
    return dec, slots, [(s, p) for s, p in zip(seqs, plens, strict=True)]


def test_replay_equals_eager_bit_for_bit_in_every_regime() -> None:
    eager, slots, seqs = prefilled(cuda_graphs=False)
    replay, slots_r, _ = prefilled(cuda_graphs=True)
    assert replay.cuda_graphs and not eager.cuda_graphs and slots == slots_r
    for t in range(6):  # rows cross block_size at different steps; batches of 6, 3 and 1 rows
        rows = [0, 1, 2, 3, 4, 5] if t % 3 == 0 else [1, 3, 4] if t % 3 == 1 else [5]
        toks = torch.tensor([seqs[i][0][seqs[i][1] + t] for i in rows])
        a = eager.step([slots[i] for i in rows], toks)
        b = replay.step([slots[i] for i in rows], toks)
        assert torch.equal(a, b), t
    assert same(snapshot(eager, slots), snapshot(replay, slots))
    assert all(isinstance(bk.graph, ReplayGraph) for bk in replay._cached.captured.values())


def test_replay_decoder_matches_forward_across_block_size() -> None:
    model = tiny_model()
    bs = model.config.block_size
    seq = torch.randint(0, 97, (bs + 8,), generator=torch.Generator().manual_seed(4)).tolist()
    for plen in (1, 20, bs + 1):
        assert teacher_force(model, seq, plen, Decoder(tiny_model(), num_slots=3, cuda_graphs=True)) <= 1e-4


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_padded_rows_leave_every_other_slot_untouched(cuda_graphs: bool) -> None:
    dec, slots, seqs = prefilled(cuda_graphs)
    rows, toks = [0, 2, 4], [5, 6, 7]
    stepped = [slots[i] for i in rows]
    others = [s for s in slots if s not in stepped] + [dec.allocate()]  # a never-used slot too
    before = snapshot(dec, others)
    out = dec.step(stepped, torch.tensor(toks))  # 3 rows -> bucket 4: one scratch row
    assert same(before, snapshot(dec, others))
    for j, (i, tok) in enumerate(zip(rows, toks, strict=True)):  # padding did not leak into the real rows
        seq, p = seqs[i]
        assert (out[j] - reference_logits(dec.model, [*seq[:p], tok])).abs().max() <= 1e-4
        assert dec.length(slots[i]) == p + 1 and int(dec.state.pos[slots[i]]) == p + 1


def test_buckets_are_captured_on_first_use_with_static_buffers() -> None:
    dec, slots, _ = prefilled(cuda_graphs=True, n=3)  # all three before block_size: the cached regime
    assert dec._cached.captured == {}
    dec.step(slots, torch.tensor([1, 2, 3]))
    assert sorted(dec._cached.captured) == [4]
    bk = dec._cached.captured[4]
    ptrs = (bk.slots.data_ptr(), bk.tokens.data_ptr(), bk.out.data_ptr())
    out = dec.step(slots[::-1], torch.tensor([7, 8, 9]))  # same bucket: replayed, not recaptured
    assert dec._cached.captured[4] is bk and ptrs == (bk.slots.data_ptr(), bk.tokens.data_ptr(), bk.out.data_ptr())
    scratch = dec.state.scratch
    assert bk.slots.tolist() == [*slots[::-1], scratch] and bk.tokens.tolist() == [7, 8, 9, 0]
    kept = out.clone()
    assert out.data_ptr() != bk.out.data_ptr()
    dec.step(slots[:1], torch.tensor([4]))
    assert sorted(dec._cached.captured) == [1, 4]
    dec.step(slots, torch.tensor([1, 2, 3]))  # bucket 4 replays again; the earlier result is a copy
    assert torch.equal(out, kept)


def test_warmup_captures_every_bucket_and_touches_only_the_scratch_slot() -> None:
    dec = prefilled(cuda_graphs=True)[0]
    before = snapshot(dec, list(range(dec.state.num_slots)))
    dec.warmup()
    assert sorted(dec._cached.captured) == sorted(dec._window.captured) == dec.buckets == [1, 2, 4, 8]
    assert same(before, snapshot(dec, list(range(dec.state.num_slots))))


def test_eager_decoder_captures_nothing() -> None:
    dec, slots, _ = prefilled(cuda_graphs=False)
    dec.warmup()
    dec.step(slots, torch.tensor([1] * len(slots)))
    assert dec._cached.captured == {} and dec._window.captured == {}


def test_a_step_needs_distinct_slots() -> None:
    dec, slots, _ = prefilled(cuda_graphs=True)
    with pytest.raises(ValueError, match="distinct"):
        dec.step([slots[0], slots[0]], torch.tensor([1, 2]))


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------------------
def cuda_decoder(dtype: torch.dtype, **kw) -> Decoder:
    return Decoder(tiny_model(n_embd=64, n_layer=3), num_slots=8, device="cuda", dtype=dtype, **kw)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_graphs_match_eager_and_forward(kernels: str) -> None:
    if kernels == "triton":
        pytest.importorskip("triton")
    model = tiny_model(n_embd=64, n_layer=3)
    bs = model.config.block_size
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, 97, (bs + 10,), generator=g).tolist() for _ in range(5)]
    plens = [1, 7, 20, bs - 2, bs + 3]
    decs = [cuda_decoder(torch.float32, cuda_graphs=cg, kernels=kernels) for cg in (False, True)]
    slots = []
    for dec in decs:
        dec.warmup()
        slots = [dec.allocate() for _ in seqs]
        dec.prefill(slots, [s[:p] for s, p in zip(seqs, plens, strict=True)])
    for t in range(6):  # rows cross block_size; batches of 5 and 3 rows (buckets 8 and 4)
        rows = slots if t % 2 == 0 else [slots[1], slots[4], slots[2]]
        toks = torch.randint(0, 97, (len(rows),), generator=g)
        eager, graphed = (d.step(rows, toks) for d in decs)
        assert torch.equal(eager, graphed), t
    for i in range(5):  # every slot's state is the same after the same steps
        assert torch.equal(decs[0].state.conv[:, i], decs[1].state.conv[:, i])
    assert teacher_force(model, seqs[0], 3, cuda_decoder(torch.float32, cuda_graphs=True, kernels=kernels)) <= 1e-4


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_bf16_graphs_within_bf16_tolerance(kernels: str) -> None:
    if kernels == "triton":
        pytest.importorskip("triton")
    model = tiny_model(n_embd=64, n_layer=3)
    seq = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    dec = cuda_decoder(torch.bfloat16, cuda_graphs=True, kernels=kernels)
    slot = dec.allocate()
    dec.prefill([slot], [seq[:4]])
    for n in range(4, 44):
        got = dec.step([slot], torch.tensor([seq[n]]))[0].cpu()
        ref = reference_logits(model, seq[: n + 1])
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 0.02, n


@pytest.mark.cuda
@cuda
def test_cuda_graphs_over_a_compiled_step_match_forward() -> None:
    model = tiny_model(n_embd=64, n_layer=3)
    bs = model.config.block_size
    seq = torch.randint(0, 97, (bs + 4,), generator=torch.Generator().manual_seed(10)).tolist()
    dec = cuda_decoder(torch.float32, cuda_graphs=True, kernels="torch", compile=True)
    assert dec.compiled
    assert teacher_force(model, seq, bs - 6, dec) <= 1e-4  # compiled cached steps, then the window step
