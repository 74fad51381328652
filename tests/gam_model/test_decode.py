"""The cached step and prefill equal the reference forward (DESIGN 1.2-1.3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gam_model.decode import Decoder, bucket_sizes, pad_to
from gam_model.model import GAM
from tests.conftest import tiny_model

TOL = 1e-4


def reference_logits(model: GAM, seq: list[int]) -> torch.Tensor:
    """Next-token logits after seq: the forward on the last min(N, block_size) tokens."""
    ctx = seq[-model.config.block_size :]
    with torch.no_grad():
        return model(torch.tensor([ctx]))[0, -1]


def teacher_force(model: GAM, seq: list[int], prompt_len: int, dec: Decoder | None = None) -> float:
    """Prefill seq[:prompt_len], then step the rest; max abs diff against the (CPU) reference at every step."""
    dec = dec or Decoder(model, num_slots=2)
    slot = dec.allocate()
    first = dec.prefill([slot], [seq[:prompt_len]])[0].cpu()
    worst = (first - reference_logits(model, seq[:prompt_len])).abs().max()
    for n in range(prompt_len, len(seq)):
        got = dec.step([slot], torch.tensor([seq[n]]))[0].cpu()
        worst = max(worst, (got - reference_logits(model, seq[: n + 1])).abs().max())
    dec.free(slot)
    return float(worst)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("n_layer", [1, 2, 3, 4])
def test_step_matches_forward_across_regimes(k: int, n_layer: int) -> None:
    model = tiny_model(conv_kernel=k, n_layer=n_layer)
    R, bs = model.config.receptive_field, model.config.block_size
    g = torch.Generator().manual_seed(k * 10 + n_layer)
    seq = torch.randint(0, model.config.vocab_size, (bs + 20,), generator=g).tolist()
    # prompt of 1, < R, between R and block size, exactly block size, > block size; generations cross bs
    for plen in sorted({1, max(1, R - 1), (R + bs) // 2, bs, bs + 5}):
        assert teacher_force(model, seq, plen) <= TOL, f"prompt length {plen}"


def test_batch_of_slots_at_different_positions(model: GAM) -> None:
    bs = model.config.block_size
    dec = Decoder(model, num_slots=5)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (bs + 12,), generator=g).tolist() for _ in range(5)]
    plens = [1, 3, 17, bs - 2, bs + 4]
    slots = [dec.allocate() for _ in seqs]
    out = dec.prefill(slots, [s[:p] for s, p in zip(seqs, plens, strict=True)])
    for i in range(5):
        assert (out[i] - reference_logits(model, seqs[i][: plens[i]])).abs().max() <= TOL
    for t in range(8):  # every row advances; rows cross block_size at different steps
        toks = torch.tensor([s[p + t] for s, p in zip(seqs, plens, strict=True)])
        out = dec.step(slots, toks)
        for i in range(5):
            ref = reference_logits(model, seqs[i][: plens[i] + t + 1])
            assert (out[i] - ref).abs().max() <= TOL, (i, t)


def test_subset_of_slots_and_freed_reused_slots(model: GAM) -> None:
    dec = Decoder(model, num_slots=3)
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 97, (40,), generator=g).tolist() for _ in range(3))
    sa, sb = dec.allocate(), dec.allocate()
    dec.prefill([sa, sb], [a[:5], b[:9]])
    dec.step([sb], torch.tensor([b[9]]))  # only b advances
    out = dec.step([sa, sb], torch.tensor([a[5], b[10]]))
    assert (out[0] - reference_logits(model, a[:6])).abs().max() <= TOL
    assert (out[1] - reference_logits(model, b[:11])).abs().max() <= TOL
    dec.free(sa)
    sc = dec.allocate()
    assert sc == sa  # reused
    assert teacher_force(model, c, 2, dec) <= TOL  # a stale history must not leak into the new sequence
    out = dec.step([sb], torch.tensor([b[11]]))
    assert (out[0] - reference_logits(model, b[:12])).abs().max() <= TOL


def test_step_refuses_a_slot_twice_and_leaves_the_state_alone(model: GAM) -> None:
    dec = Decoder(model, num_slots=2)
    sa, sb = dec.allocate(), dec.allocate()
    dec.prefill([sa, sb], [[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="distinct slots"):
        dec.step([sa, sb, sa], torch.tensor([7, 8, 9]))
    out = dec.step([sa, sb], torch.tensor([7, 8]))  # the refused step advanced nothing
    assert (out[0] - reference_logits(model, [1, 2, 3, 7])).abs().max() <= TOL
    assert (out[1] - reference_logits(model, [4, 5, 8])).abs().max() <= TOL


def test_prefill_work_is_independent_of_prompt_length(model: GAM) -> None:
    R = model.config.receptive_field
    seen: list[int] = []
    h = model.token_embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    dec = Decoder(model, num_slots=1)
    for n in (R, 10 * R, 200):
        slot = dec.allocate()
        dec.prefill([slot], [[1] * n])
        dec.free(slot)
    h.remove()
    assert seen == [R, R, R]


def test_changing_a_token_outside_the_receptive_field_leaves_logits_identical(model: GAM) -> None:
    R = model.config.receptive_field
    seq = list(range(1, 25))
    other = list(seq)
    other[-R - 1] = 50
    a = model(torch.tensor([seq]))[0, -1]
    b = model(torch.tensor([other]))[0, -1]
    assert torch.equal(a, b)


def test_bf16_step_within_bf16_tolerance() -> None:
    model = tiny_model()
    seq = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = [reference_logits(model, seq[: n + 1]) for n in range(4, 45)]
    dec = Decoder(tiny_model(), num_slots=1, dtype=torch.bfloat16)
    slot = dec.allocate()
    dec.prefill([slot], [seq[:4]])
    for i, n in enumerate(range(4, 44)):
        got = dec.step([slot], torch.tensor([seq[n]]))[0]
        scale = ref[i].abs().max()
        assert (got - ref[i]).abs().max() <= 0.05 * scale + 0.02


def test_buckets() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert pad_to(3, [1, 2, 4, 8]) == 4
    with pytest.raises(ValueError):
        pad_to(9, [1, 2, 4, 8])


def test_kernel_options(model: GAM) -> None:
    assert Decoder(model, num_slots=1).kernels == "torch"  # auto on CPU: the PyTorch reference
    assert not Decoder(model, num_slots=1).cuda_graphs and not Decoder(model, num_slots=1).compiled
    with pytest.raises(ValueError, match="kernels must be"):
        Decoder(model, num_slots=1, kernels="fused")
    assert Decoder(model, num_slots=1).weight_layout == "contiguous"  # auto on CPU in fp32
    assert Decoder(tiny_model(), num_slots=1, dtype=torch.bfloat16).weight_layout == "view"
    with pytest.raises(ValueError, match="weight_layout must be"):
        Decoder(model, num_slots=1, weight_layout="packed")


@pytest.mark.parametrize("contiguous", [False, True])
def test_decode_ready_weights_follow_the_model(contiguous: bool) -> None:
    """StepWeights stacks [gate; memory bank] and transposes the conv (weights as views or copies): same as GAM.step."""
    from gam_model.kernels import reference
    from gam_model.step import StepWeights, step

    model = tiny_model(n_layer=3)
    cfg = model.config
    g = torch.Generator().manual_seed(11)
    idx, pos = torch.randint(0, cfg.vocab_size, (4,), generator=g), torch.tensor([0, 1, 9, cfg.block_size - 1])
    hist = torch.randn(cfg.n_layer, 4, cfg.history, cfg.n_embd, generator=g)
    with torch.no_grad():
        ref, ref_hist = model.step(idx, pos, hist.clone())
        got = step(StepWeights.from_model(model, contiguous), idx, pos, hist, reference)  # hist updated in place
    assert (got - ref).abs().max() <= TOL
    assert (hist - ref_hist).abs().max() <= 1e-6


def test_sliding_step_computes_only_the_receptive_pyramid() -> None:
    """Past block_size, block i computes only the (L-1-i)(K-1)+1 positions the last logits depend on."""
    model = tiny_model(n_layer=3, conv_kernel=3)
    cfg = model.config
    dec = Decoder(model, num_slots=1)
    slot = dec.allocate()
    seq = torch.randint(0, cfg.vocab_size, (cfg.block_size + 2,), generator=torch.Generator().manual_seed(5)).tolist()
    dec.prefill([slot], [seq[:-1]])  # already past block_size: the next step is a window step
    seen: list[int] = []
    hooks = [blk.ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for blk in model.blocks]
    out = dec.step([slot], torch.tensor([seq[-1]]))[0]
    for h in hooks:
        h.remove()
    assert seen == [(cfg.n_layer - 1 - i) * cfg.history + 1 for i in range(cfg.n_layer)]  # [5, 3, 1]
    assert (out - reference_logits(model, seq)).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_local_tail_is_the_causal_conv_at_the_last_positions(k: int, dtype: torch.dtype) -> None:
    """The window path's conv at the last n positions is conv1d's there (also when the input is shorter than
    n + K - 1: zeros before its first position, as conv1d's padding), and bit for bit what the cached step computes
    at each of those positions from its K inputs."""
    blk = tiny_model(conv_kernel=k).block_list()[0].to(dtype)
    w, b = blk.causal_conv.weight.squeeze(1).t(), blk.causal_conv.bias
    g = torch.Generator().manual_seed(k)
    for t in (1, 2, 5, 9):
        h = torch.randn(3, t, blk.ln1.normalized_shape[0], generator=g).to(dtype)
        hp = torch.nn.functional.pad(h.transpose(1, 2), (k - 1, 0))
        full = torch.nn.functional.conv1d(hp, blk.causal_conv.weight, b, groups=h.shape[-1]).transpose(1, 2)
        padded = hp.transpose(1, 2)  # (B, T+K-1, C)
        for n in range(1, t + 1):
            got = blk.local_tail(h, n)
            assert got.shape == (3, n, h.shape[-1])
            tol = 1e-6 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, full[:, -n:], rtol=0, atol=tol)
            for j in range(n):  # position t - n + j: its K inputs end there
                end = t - n + j + k
                assert torch.equal(got[:, j], (padded[:, end - k : end].contiguous() * w).sum(dim=1) + b)


# -- small batches on one thread (Decoder.tune_threads) ------------------------------------------------------------
def test_rows_on_one_thread_keeps_the_small_batches_where_one_thread_is_about_as_fast() -> None:
    from gam_model.decode import ONE_THREAD_SLACK, rows_on_one_thread

    fast, slow = [1.0, 1.0, 1.0], [1.0 / ONE_THREAD_SLACK - 0.01] * 3  # one thread's times against all threads' 1.0
    assert rows_on_one_thread({1: (fast, fast), 2: (fast, fast), 4: (fast, fast)}) == 4
    assert rows_on_one_thread({1: (fast, fast), 2: (fast, slow), 4: (fast, fast)}) == 1  # the first miss ends it
    assert rows_on_one_thread({1: (fast, slow), 2: (fast, fast)}) == 0
    slack = [ONE_THREAD_SLACK - 0.01] * 3  # slower alone, within the slack: still one thread
    assert rows_on_one_thread({1: (slack, fast), 2: (slack, fast)}) == 2
    assert rows_on_one_thread({}) == 0


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_steps_up_to_one_thread_rows_run_on_one_thread_and_give_the_same_logits(two_threads) -> None:
    model = tiny_model(seed=5, block_size=24)
    plain, tuned = Decoder(model, num_slots=8), Decoder(model, num_slots=8)
    tuned.one_thread_rows = 2  # as tune_threads would set it
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3], [5, 8, 9, 7]]
    for dec in (plain, tuned):
        dec.slots = [dec.allocate() for _ in prompts]
    for rows, want_threads in ((1, 1), (2, 1), (4, 2), (1, 1)):
        torch.testing.assert_close(
            tuned.prefill(tuned.slots[:rows], prompts[:rows]), plain.prefill(plain.slots[:rows], prompts[:rows])
        )
        assert torch.get_num_threads() == 2  # prefill runs on every thread
        for t in range(30):  # past block_size: the sliding-window step too
            tokens = torch.tensor([(7 * t + r) % model.config.vocab_size for r in range(rows)])
            # a sliding row's step is a window forward (R tokens), not the small cached step tune_threads timed
            sliding = any(tuned.length(s) >= model.config.block_size for s in tuned.slots[:rows])
            got = tuned.step(tuned.slots[:rows], tokens)
            assert torch.get_num_threads() == (2 if sliding else want_threads)
            torch.testing.assert_close(got, plain.step(plain.slots[:rows], tokens))


def step_clock(monkeypatch, one: float, every: float) -> None:
    """tune_threads' clock, faked: each step it times takes `one` seconds on one thread, `every` on more."""
    import gam_model.decode as decode

    now = [0.0]

    def perf_counter() -> float:  # read before and after each step: the second read's advance is the step's time
        now[0] += one if torch.get_num_threads() == 1 else every
        return now[0]

    monkeypatch.setattr(decode, "time", SimpleNamespace(perf_counter=perf_counter))


def test_tune_threads_leaves_tiny_steps_and_deterministic_mode_alone(two_threads, monkeypatch) -> None:
    model = tiny_model(seed=5)
    step_clock(monkeypatch, 0.0005, 0.0005)
    assert Decoder(model, num_slots=8).tune_threads() == 0  # a step far under TUNE_MIN_STEP_S
    # a busy host: all threads' step stalls at its barriers; the step itself is still tiny (it read 15 ms on two
    # threads, 0.9 ms on one, while another process ran here, and was tuned)
    step_clock(monkeypatch, 0.0009, 0.015)
    assert Decoder(model, num_slots=8).tune_threads() == 0
    assert Decoder(model, num_slots=8, deterministic=True).tune_threads() == 0
    torch.set_num_threads(1)
    assert Decoder(model, num_slots=8).tune_threads() == 0
    assert torch.get_num_threads() == 1


def test_tune_threads_measures_and_frees_its_slots(two_threads, monkeypatch) -> None:
    import gam_model.decode as decode

    monkeypatch.setattr(decode, "TUNE_MIN_STEP_S", 0.0)  # a tiny model's step counts as worth measuring here
    dec = Decoder(tiny_model(seed=5), num_slots=3)
    rows = dec.tune_threads(reps=3)
    assert rows in (0, 1, 2)  # 4 rows do not fit in 3 slots: not measured
    assert dec.one_thread_rows == rows and dec.state.free_slots == 3 and torch.get_num_threads() == 2


def test_tune_threads_again_keeps_the_thread_count_it_tracks(two_threads, monkeypatch) -> None:
    """tune_threads restores every thread when it is done: a second call, after small steps left one thread, must
    not leave the decoder believing one is still set (its small steps then ran on every thread)."""
    import gam_model.decode as decode

    monkeypatch.setattr(decode, "TUNE_MIN_STEP_S", 0.0)
    monkeypatch.setattr(decode, "rows_on_one_thread", lambda times: 2)  # the decision, not the timing
    dec = Decoder(tiny_model(seed=5), num_slots=4)
    slot = dec.allocate()
    dec.prefill([slot], [[1, 2, 3]])
    for _ in range(2):
        assert dec.tune_threads(reps=1) == 2 and torch.get_num_threads() == 2
        dec.step([slot], torch.tensor([4]))  # straight after: no prefill in between sets every thread again
        assert torch.get_num_threads() == 1


def test_all_threads_restores_every_thread_after_a_small_step(two_threads) -> None:
    dec = Decoder(tiny_model(seed=5), num_slots=4)
    dec.all_threads()  # untuned: nothing to do
    assert torch.get_num_threads() == 2
    dec.one_thread_rows = 1
    slot = dec.allocate()
    dec.prefill([slot], [[1, 2, 3]])
    dec.step([slot], torch.tensor([4]))
    assert torch.get_num_threads() == 1
    dec.all_threads()
    assert torch.get_num_threads() == 2
