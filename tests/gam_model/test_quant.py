"""Weight-only quantization (gam_model.quant): the quantizer, its kernels, and exactness of the quantized model itself.

Tolerances compare two computations of the SAME quantized model, so they are set by the activation dtype only:
float32 1e-4 (as the unquantized decode tests), bfloat16 3e-2 (a few bf16 ulps of the tiny model's logits, which
reach about 2; the step and the forward round intermediate activations at different points).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gam_model import data, quant
from gam_model.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from gam_model.cli.quantize import main as quantize_main
from gam_model.decode import Decoder
from gam_model.evaluate import score_tokens
from gam_model.model import GAM
from gam_model.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantMemory,
    dequantize,
    qmm,
    quantize_model_,
    quantize_weight,
)
from tests.conftest import tiny_model
from tests.gam_model.test_decode import teacher_force

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def quantized(method: str, dtype: torch.dtype = torch.float32, **kw) -> GAM:
    return quantize_model_(tiny_model(**kw).to(dtype), method)


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_error_and_scales(method: str, dtype: torch.dtype) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 48).unsqueeze(1)
    w[3] = 0.0  # an all-zero row keeps a finite scale
    q, s = quantize_weight(w, method, dtype)
    assert q.dtype == quant.STORAGE[method] and s.dtype == dtype and q.shape == w.shape and s.shape == (48,)
    assert torch.equal(s.to(dtype).float(), s.float())  # the scales the kernel sees are the ones quantized against
    err = (dequantize(q, s) - w).abs()  # (N, K)
    if method == "int8":
        # half a step of rounding, plus the row max that the clamp at 127 may cut when the scale was rounded down
        assert (err <= s.float().unsqueeze(1) * 0.51 + w.abs().amax(1, keepdim=True) * 2**-7).all()
    else:
        # e4m3: 3 mantissa bits (relative half-ulp 2^-4), subnormals below 2^-6 step 2^-9 in units of the scale
        assert (err <= w.abs() * 2**-4 + s.float().unsqueeze(1) * 2**-9 + 1e-7).all()
    assert torch.isfinite(dequantize(q, s)).all() and err[3].max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_kernel_equals_dequantized_matmul(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    q, s = quantize_weight(torch.randn(40, 24, generator=g) * 0.1, "int8", dtype)
    x = torch.randn(2, 3, 24, generator=g).to(dtype)  # leading dims are flattened and restored
    ref = x.float() @ dequantize(q, s).t()  # (2, 3, 40) the weight the pair stands for
    got = qmm(x, q, s)
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    rel = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (got.float() - ref).abs().max() <= rel * ref.abs().max()


def test_fp8_kernel_equals_its_dequantized_reference() -> None:
    """torch._scaled_mm (row-wise scales) against the CPU reference: both operands dequantized, fp32 matmul."""
    g = torch.Generator().manual_seed(2)
    q, s = quantize_weight(torch.randn(32, 48, generator=g) * 0.1, "fp8", torch.bfloat16)
    x = torch.randn(5, 48, generator=g).bfloat16()
    xq, xs = quant.fp8_rows(x)  # (5, 48) e4m3, (5, 1)
    ref = (xq.float() * xs) @ dequantize(q, s).t()  # (5, 32)
    got = qmm(x, q, s)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    # and the W8A8 product stays near the full-precision one (e4m3 on both sides: a few percent)
    full = x.float() @ dequantize(q, s).t()
    assert (got.float() - full).abs().max() <= 0.1 * full.abs().max()


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_a_row_does_not_depend_on_the_other_rows(method: str) -> None:
    """Padding rows (any content, any count) never change a real row: the kernels are row-wise."""
    g = torch.Generator().manual_seed(3)
    q, s = quantize_weight(torch.randn(64, 32, generator=g) * 0.1, method, torch.bfloat16)
    x = torch.randn(9, 32, generator=g).bfloat16()
    alone = qmm(x[:1], q, s)
    for n in (2, 3, 5, 9):
        assert torch.equal(qmm(x[:n], q, s)[:1], alone)
    noisy = torch.cat([x[:1], torch.randn(7, 32, generator=g).bfloat16() * 100])
    assert torch.equal(qmm(noisy, q, s)[:1], alone)


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_step_equals_the_quantized_forward_in_every_regime(method: str, dtype: torch.dtype) -> None:
    """The decoder (prefill + cached step + sliding-window step) against GAM.forward of the same quantized model."""
    model = quantized(method, dtype, n_layer=3)
    R, bs = model.config.receptive_field, model.config.block_size
    seq = torch.randint(0, model.config.vocab_size, (bs + 12,), generator=torch.Generator().manual_seed(4)).tolist()
    dec = Decoder(model, num_slots=2)
    for plen in (1, R - 1, (R + bs) // 2, bs + 3):  # < R, between R and block_size, past it; generations cross it
        assert teacher_force(model, seq, plen, dec) <= TOL[dtype], f"prompt length {plen}"


def test_quantized_model_stays_close_to_the_original() -> None:
    full = tiny_model(n_layer=3)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = full(idx).log_softmax(-1)
        for method, kl_max in (("int8", 1e-3), ("fp8", 2e-2)):
            got = quantized(method, n_layer=3)(idx).log_softmax(-1)
            kl = F.kl_div(got, ref, log_target=True, reduction="batchmean") / idx.shape[1]  # per token
            assert 0 < kl <= kl_max, (method, kl)


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_lookup_dequantizes_the_heads_rows(method: str, dtype: torch.dtype) -> None:
    """The lookup and the head share one quantized table: a looked-up row is exactly its dequantized row."""
    full = tiny_model().to(dtype)
    model = quantized(method, dtype)
    head = model.head
    assert isinstance(head, QuantLinear) and head.qweight.dtype == quant.STORAGE[method]
    assert isinstance(model.token_embedding, QuantEmbedding) and model.token_embedding.head is head
    idx = torch.tensor([[3, 0, 96], [3, 3, 50]])
    got = model.token_embedding(idx)  # (2, 3, C)
    want = dequantize(head.qweight[idx.flatten()], head.scale[idx.flatten()]).to(dtype).view(2, 3, -1)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(model.token_embedding.weight, dequantize(head.qweight, head.scale).to(dtype))
    # the quantization the head has, and no more: within its error bound of the original table (as above), plus the
    # rounding of the dequantized row to the activation dtype
    table, s = full.token_embedding.weight.detach().float(), head.scale.float().unsqueeze(1)  # (V, C), (V, 1)
    if method == "int8":
        bound = s * 0.51 + table.abs().amax(1, keepdim=True) * 2**-7
    else:
        bound = table.abs() * 2**-4 + s * 2**-9
    bound = bound + table.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-23) + 1e-7
    assert ((model.token_embedding.weight.float() - table).abs() <= bound).all()
    assert not any(k.startswith("token_embedding.") for k in model.state_dict())  # stored once, as the head's
    assert all(isinstance(b.memory_bank, QuantMemory) and isinstance(b.gate, QuantLinear) for b in model.blocks)
    assert quant.quantization_of(model) == method and quant.quantization_of(full) == "none"
    with pytest.raises(quant.QuantizationError, match="already quantized"):
        quantize_model_(model, method)


def test_decoder_keeps_one_int8_copy_and_no_full_precision_projection() -> None:
    """The fused [gate; memory] rows are the model's own rows (views), and no float tensor of a projection's or the
    token table's shape is held anywhere: the Decoder's resident weights are int8 except the position table, norms,
    biases and scales."""
    model = quantized("int8", torch.bfloat16)
    dec = Decoder(model, num_slots=2)
    cfg = model.config
    C, S, V = cfg.n_embd, cfg.n_slots, cfg.vocab_size
    for blk, lw in zip(model.blocks, dec.weights.layers, strict=True):
        assert blk.gate.qweight.untyped_storage().data_ptr() == lw.gm.q.untyped_storage().data_ptr()
        assert blk.memory_bank.qweight.untyped_storage().data_ptr() == lw.gm.q.untyped_storage().data_ptr()
    storages = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    floats = {tuple(t.shape) for t in storages.values() if t.is_floating_point() and t.dim() == 2}
    assert floats == {(cfg.block_size, C)}  # the position table only: the token lookup reads the head's rows
    int8 = sum(t.untyped_storage().nbytes() for t in storages.values() if t.dtype == torch.int8)
    # per layer: fused [gate; memory] rows, ffn.0, ffn.2, the memory read's transposed copy; plus the head (= table)
    assert int8 == cfg.n_layer * ((2 * C + S) * C + 8 * C * C + S * C) + V * C


@pytest.mark.parametrize("graphs", [False, True])
def test_batch_invariance_and_graph_replay(graphs: bool) -> None:
    """A row's logits are bit-identical alone or beside other rows (any content), eager or through the CPU replay of
    the captured-graph path (bf16 int8)."""
    model = quantized("int8", torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    seq = torch.randint(0, 97, (20,), generator=g).tolist()
    alone = Decoder(model, num_slots=1, cuda_graphs=graphs)
    crowd = Decoder(model, num_slots=5, cuda_graphs=graphs)
    a = alone.allocate()
    others = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 30, 41)]
    slots = [crowd.allocate() for _ in range(5)]
    want = alone.prefill([a], [seq[:6]])
    got = crowd.prefill(slots, [seq[:6], *others])
    assert torch.equal(got[0], want[0])
    for t in range(6, 14):
        want = alone.step([a], torch.tensor([seq[t]]))
        n = 1 + t % 4  # the batch size changes every step: other buckets, other padding
        got = crowd.step(slots[:n], torch.tensor([seq[t], *torch.randint(0, 97, (n - 1,), generator=g).tolist()]))
        assert torch.equal(got[0], want[0]), t


def test_gam_eval_scores_what_the_decoder_serves() -> None:
    """score_tokens (gam-eval, prompt logprobs) on a quantized model equals the decoder's next-token NLL."""
    model = quantized("int8", n_layer=2)
    bs = model.config.block_size
    ids = torch.randint(0, 97, (bs + 10,), generator=torch.Generator().manual_seed(7))
    nll, n = score_tokens(model, ids)
    dec = Decoder(model, num_slots=1)
    slot = dec.allocate()
    logits = [dec.prefill([slot], [ids[:1].tolist()])[0]]
    logits += [dec.step([slot], ids[t : t + 1])[0] for t in range(1, len(ids) - 1)]
    served = F.cross_entropy(torch.stack(logits), ids[1:], reduction="sum").item()
    assert n == len(ids) - 1 and abs(nll - served) <= 1e-4 * n


def tiny_checkpoint(d: Path) -> Path:
    """A bf16 checkpoint directory of a tiny random model (the project's byte-level BPE on the WikiText-2 excerpt)."""
    tok = data.train_tokenizer([FIXTURES / "wikitext2_train_excerpt.txt"], "bytelevel", vocab_size=300)
    model = tiny_model(vocab_size=tok.vocab_size).to(torch.bfloat16)
    (d / "src").mkdir()
    (d / "src" / "README.md").write_text("# tiny\n")
    return save_checkpoint(d / "src", model, tok, CheckpointMeta(model_name="tiny", eos_token_id=tok.eos_token_id))


def test_gam_quantize_round_trip(tmp_path: Path) -> None:
    """gam-quantize writes what quantize-at-load builds: same logits, a smaller file, a config that says so."""
    src = tiny_checkpoint(tmp_path)
    dst = tmp_path / "int8"
    quantize_main([str(src), str(dst)])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["method"] == "int8" and cfg["quantization"]["dtype"] == "bfloat16"
    assert cfg["quantization"]["embedding"] == "tied"  # one table: the head's rows, no token_embedding.weight
    assert "head.qweight" in load_file(dst / "model.safetensors") and not any(
        k.startswith("token_embedding.") for k in load_file(dst / "model.safetensors")
    )
    assert (dst / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    assert (dst / "README.md").read_text().endswith("# tiny\n") and (dst / "tokenizer.json").is_file()
    at_load, _, _ = load_checkpoint(src, quantize="int8")
    stored, _, meta = load_checkpoint(dst)  # auto: as stored, in its own dtype
    assert meta.quantization is not None and quant.quantization_of(stored) == "int8"
    assert stored.token_embedding.weight.dtype == torch.bfloat16
    idx = torch.randint(0, stored.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(stored(idx), at_load(idx))
    for a, b in zip(Decoder(stored, 1).weights.layers, Decoder(at_load, 1).weights.layers, strict=True):
        assert torch.equal(a.gm.q, b.gm.q) and torch.equal(a.gm.scale, b.gm.scale)


def test_pre_quantized_checkpoint_from_before_the_tie_still_loads(tmp_path: Path) -> None:
    """A checkpoint pre-quantized before the lookup was tied to the head (a full-precision token_embedding.weight beside
    the head's rows, no "embedding" in its quantization entry) loads as it was made and decodes exactly."""
    src = tiny_checkpoint(tmp_path)
    quantize_main([str(src), str(tmp_path / "int8")])
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "int8", old)
    table = load_file(src / "model.safetensors")["token_embedding.weight"]  # (V, C) bf16
    save_file({**load_file(old / "model.safetensors"), "token_embedding.weight": table}, old / "model.safetensors")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization"]["embedding"]
    (old / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load_checkpoint(old)
    assert type(model.token_embedding) is torch.nn.Embedding and torch.equal(model.token_embedding.weight, table)
    assert quant.quantization_of(model) == "int8"
    seq = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(10)).tolist()
    assert teacher_force(model, seq, 5, Decoder(model, num_slots=1)) <= TOL[torch.bfloat16]
    cfg["quantization"]["embedding"] = "full"  # a layout this version does not know
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization entry is not understood"):
        load_checkpoint(old)


def test_bad_combinations_fail_at_load_with_a_reason(tmp_path: Path) -> None:
    src = tiny_checkpoint(tmp_path)
    dst = tmp_path / "int8"
    quantize_main([str(src), str(dst)])
    with pytest.raises(CheckpointError, match=r"pre-quantized to int8 .* can only be served as int8"):
        load_checkpoint(dst, quantize="none")
    with pytest.raises(CheckpointError, match=r"pre-quantized to int8"):
        load_checkpoint(dst, quantize="fp8")
    with pytest.raises(CheckpointError, match=r"pre-quantized for bfloat16 activations.*--dtype float32"):
        load_checkpoint(dst, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"fp8 needs a CUDA GPU .* the device is cpu"):
        load_checkpoint(src, quantize="fp8")
    with pytest.raises(CheckpointError, match="--quantize must be one of"):
        load_checkpoint(src, quantize="int4")
    with pytest.raises(SystemExit, match="DST must differ"):
        quantize_main([str(src), str(src)])


def test_auto_dtype() -> None:
    cpu = torch.device("cpu")
    assert quant.resolve("auto", None, None, cpu) == ("none", torch.float32)
    assert quant.resolve("int8", None, None, cpu) == ("int8", torch.bfloat16)  # the int8 CPU kernel's fast path
    assert quant.resolve("int8", None, torch.float32, cpu) == ("int8", torch.float32)
    stored = quant.describe("int8", torch.float16)
    assert quant.resolve("auto", stored, None, cpu) == ("int8", torch.float16)


# -- CUDA (skipped without a GPU; bench/gpu_check.sh runs them) ---------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_quantized_step_equals_forward(method: str, graphs: bool, kernels: str) -> None:
    """On CUDA (bf16): the quantized decoder with/without graphs and Triton against the quantized forward."""
    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    if kernels == "triton":
        pytest.importorskip("triton")
    model = quantize_model_(tiny_model(n_embd=64, n_layer=3, vocab_size=128, n_slots=32).cuda().bfloat16(), method)
    seq = torch.randint(0, 128, (model.config.block_size + 8,), generator=torch.Generator().manual_seed(9)).tolist()
    dec = Decoder(model, num_slots=4, cuda_graphs=graphs, kernels=kernels)
    bs = model.config.block_size
    for plen in (1, 20, bs + 2):
        slot = dec.allocate()
        got = [dec.prefill([slot], [seq[:plen]])[0]]
        got += [dec.step([slot], torch.tensor([seq[n]]))[0] for n in range(plen, len(seq))]
        with torch.no_grad():
            ref = [model(torch.tensor([seq[: n + 1][-bs:]], device="cuda"))[0, -1] for n in range(plen - 1, len(seq))]
        assert max((a - b.float()).abs().max().item() for a, b in zip(got, ref, strict=True)) <= TOL[torch.bfloat16]
        dec.free(slot)
