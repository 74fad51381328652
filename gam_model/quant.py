"""Weight-only quantization of a GAM model, in place: int8 (per-output-channel symmetric) or fp8 (e4m3, per channel).

Why in place: every path that computes logits for the served model — GAM.forward, GAM.window_forward (prefill and
the sliding-window step), gam_model.scoring (gam-eval, prompt logprobs) and the fused decode step — then reads the
same quantized weights. `quantize_model_` swaps every projection (gate, ffn.0, ffn.2, the head) for a `QuantLinear`
and every memory bank for a `QuantMemory`. StepWeights (gam_model/step.py) concatenates the gate's and the memory
bank's int8 rows and scales into the fused (2C+S, C) matrix, which is exact because each scale belongs to one
output row.

The token table stays tied to the head, as in the full-precision model: per-output-channel quantization of the head
is per-row quantization of the table, so one int8 table with per-row scales serves both (llama.cpp does the same
with a Q8_0 token_embd). The head multiplies by it; the lookup (`QuantEmbedding`) gathers the rows of the tokens and
multiplies them by their scales. "The lookup stays exact" means here: it is an exact dequantization of the quantized
model's own rows, with no approximation beyond the quantization every other weight has, and the parallel forward,
the cached step and scoring all read the same rows. Keeping a full-precision table beside the int8 one would cost
2 bytes per entry for a lookup that the head's quantization already defines (bench/quantize.py measures the quality
of the tied table against bf16: bits per byte and KL). Pre-quantized checkpoints written before the tie (a
full-precision `token_embedding.weight` beside the head's rows) still load as they were made (`tied_embedding`).

Scales are rounded to the serving dtype before the weights are quantized against them, so the kernel (which takes
its scales in the activation dtype) uses exactly the scales the weights were quantized with, and Module.to(dtype)
casts them without loss.

Kernels (`qmm`):
- int8 on CPU: `aten._weight_int8pack_mm(x (M, K) float32|bfloat16|float16, q (N, K) int8 contiguous, scales (N,)
  in x's dtype)`. Each output row depends on its own input row only (checked in the tests), so padding rows never
  change a real row. On this AVX2 CPU its float32 path is several times slower than its bf16 path, so quantized
  serving defaults to bf16 activations (`default_dtype`).
- int8 on CUDA: dequantize in the matmul, x @ q.to(x.dtype)^T * scale (gpt-fast's WeightOnlyInt8Linear; under
  torch.compile inductor fuses the cast into the GEMM). aten's CUDA `_weight_int8pack_mm` is a naive float32-only
  kernel, and `torch._int_mm` would quantize activations (and wants more than 16 rows).
- fp8 (CUDA sm_89+): W8A8 with `torch._scaled_mm`, activations quantized per row to e4m3 on the fly, weights per
  output channel. The same op runs on CPU, which is how the tests check it; serving fp8 on a CPU is refused.
torchao is not used: its quantized weight tensor does not implement torch.cat (issue #14), which the fused step
needs, and symmetric per-channel quantization is a few lines here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # imported at call time below: the model module stays free of this one
    from gam_model.model import GAM

METHODS = ("int8", "fp8")
CHOICES = ("auto", "none", *METHODS)  # what --quantize accepts: auto = what the checkpoint says (none if nothing)
QMAX = {"int8": 127.0, "fp8": 448.0}  # largest magnitude of int8 / float8_e4m3fn
FP8 = torch.float8_e4m3fn
# Stored dtype of a quantized weight. fp8 is kept as its e4m3 bit pattern in uint8: torch counts float8 as a floating
# dtype, so Module.to(bfloat16) would cast an fp8 buffer; an integer buffer only follows the device.
STORAGE = {"int8": torch.int8, "fp8": torch.uint8}
NAME = {v: k for k, v in STORAGE.items()}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --dtype of the command-line tools (gam-generate, gam-eval): gam-serve's names (which its messages use), their short
# forms, and auto (None: `default_dtype`, or a pre-quantized checkpoint's own dtype), as gam-serve resolves it
CLI_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    **DTYPE_NAMES,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class QuantizationError(ValueError):
    """A quantization setting that cannot be served (bad combination of method, checkpoint, dtype and device)."""


def quantize_weight(w: Tensor, method: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization: w (N, K) -> q (N, K) in STORAGE[method], scale (N,) in `dtype`.

    w ≈ scale[:, None] * q. The scale is rounded to `dtype` first and q is computed against the rounded scale.
    """
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1).clamp(min=1e-8)  # (N,) an all-zero row keeps a finite scale
    scale = (amax / QMAX[method]).to(dtype)  # (N,) as the kernel will see it
    r = wf / scale.float().unsqueeze(1)  # (N, K) in units of the scale
    if method == "int8":
        q = r.round().clamp(-127, 127).to(torch.int8)
    elif method == "fp8":
        q = r.clamp(-QMAX["fp8"], QMAX["fp8"]).to(FP8).view(torch.uint8)
    else:
        raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The weight a quantized pair stands for: (N, K) float32 = scale[:, None] * q."""
    values = q.view(FP8) if q.dtype == torch.uint8 else q
    return values.float() * scale.float().unsqueeze(1)


def fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row e4m3 quantization of activations: x (M, K) -> (xq (M, K) e4m3, scale (M, 1) float32)."""
    xs = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / QMAX["fp8"]  # (M, 1)
    return (x.float() / xs).clamp(-QMAX["fp8"], QMAX["fp8"]).to(FP8), xs


def qmm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (..., K) @ (scale[:, None] * q)^T -> (..., N) in x's dtype; q (N, K) contiguous int8, or fp8 bits (uint8)."""
    if x.dim() != 2:
        return qmm(x.reshape(-1, x.shape[-1]), q, scale).reshape(*x.shape[:-1], q.shape[0])
    # x (M, K) from here: the decode step's case, kept to a few attribute reads (it runs 4 times per layer and token)
    if q.dtype == torch.int8:
        if x.is_cpu:
            return torch._weight_int8pack_mm(x.contiguous(), q, scale)  # (M, N)
        return (x @ q.to(x.dtype).t()) * scale  # (M, N) dequantize in the matmul (see the module docstring)
    xq, xs = fp8_rows(x)  # (M, K) e4m3, (M, 1)
    sw = scale.float().unsqueeze(0)  # (1, N)
    return torch._scaled_mm(xq, q.view(FP8).t(), scale_a=xs, scale_b=sw, out_dtype=x.dtype)  # (M, N)


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized per output channel: y = x @ (scale * q)^T + bias."""

    qweight: Tensor
    scale: Tensor
    bias: nn.Parameter | None

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # (out, in) int8, or fp8 bits (uint8)
        self.register_buffer("scale", scale)  # (out,) in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, method: str, dtype: torch.dtype) -> QuantLinear:
        """Quantize a full-precision (out, in) weight."""
        q, s = quantize_weight(weight, method, dtype)
        return cls(q, s, None if bias is None else bias.detach().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        y = qmm(x, self.qweight, self.scale)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        n, k = self.qweight.shape
        return f"in_features={k}, out_features={n}, weight={NAME[self.qweight.dtype]}, bias={self.bias is not None}"


class QuantMemory(nn.Module):
    """A quantized memory bank M = scale * q (S, C), one quantization for both uses: scores h M^T and the read p M.

    The read folds the per-slot scales into the probabilities, (p * scale) @ q, and runs the same int8 kernel on
    q^T (C, S), a transposed int8 copy made at load (the kernel wants its weight as contiguous (N, K) rows). Why int8
    here too: the read then streams S*C bytes instead of 2*S*C (bf16) and holds S*C instead of 2*S*C, and one
    quantized M serves both matmuls (the read's own time was not measured apart from the whole step).
    """

    qweight: Tensor
    scale: Tensor
    qweight_t: Tensor
    ones: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # (S, C)
        self.register_buffer("scale", scale)  # (S,)
        self.register_buffer("qweight_t", qweight.t().contiguous(), persistent=False)  # (C, S): the read's operand
        self.register_buffer("ones", scale.new_ones(qweight.shape[1]), persistent=False)  # (C,) the read's scales

    @classmethod
    def of(cls, memory: Tensor, method: str, dtype: torch.dtype) -> QuantMemory:
        return cls(*quantize_weight(memory, method, dtype))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.qweight_t = self.qweight.t().contiguous()  # derived, not stored
        self.ones = self.scale.new_ones(self.qweight.shape[1])

    def scores(self, h: Tensor) -> Tensor:
        """h (..., C) -> h M^T (..., S)."""
        return qmm(h, self.qweight, self.scale)

    def read(self, p: Tensor) -> Tensor:
        """p (..., S) -> p M (..., C)."""
        return qmm(p * self.scale, self.qweight_t, self.ones)

    def forward(self, h: Tensor) -> Tensor:
        """The block's global path: softmax(h M^T) M, (..., C) -> (..., C)."""
        return self.read(self.scores(h).softmax(dim=-1))

    def extra_repr(self) -> str:
        s, c = self.qweight.shape
        return f"slots={s}, width={c}, weight={NAME[self.qweight.dtype]}"


class QuantEmbedding(nn.Module):
    """The token lookup of a quantized model, tied to its head: idx -> the head's quantized rows times their scales.

    It holds a reference to the head, not a copy: the rows are stored (and moved between devices) once, as the
    head's buffers, and nothing of this module appears in the state dict.
    """

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        self._head = (head,)  # a tuple, so that the head is not registered (and saved) a second time under this name

    @property
    def head(self) -> QuantLinear:
        return self._head[0]

    def forward(self, idx: Tensor) -> Tensor:
        """idx (...) -> (..., C) in the activation dtype: an exact dequantization of the gathered rows."""
        q, s = self.head.qweight, self.head.scale  # (V, C), (V,)
        flat = idx.reshape(-1)  # (n,)
        rows = dequantize(q.index_select(0, flat), s.index_select(0, flat)).to(s.dtype)  # (n, C)
        return rows.reshape(*idx.shape, q.shape[1])

    @property
    def weight(self) -> Tensor:
        """The whole dequantized table (V, C), materialised on each access: for code that asks for the table (or only
        its dtype and device); the lookup and the head never build it."""
        return dequantize(self.head.qweight, self.head.scale).to(self.head.scale.dtype)

    def extra_repr(self) -> str:
        v, c = self.head.qweight.shape
        return f"{v}, {c}, tied to the head's {NAME[self.head.qweight.dtype]} rows"


def _full_precision(lin: nn.Linear | QuantLinear) -> nn.Linear:
    """A projection of a model that is not quantized yet."""
    assert isinstance(lin, nn.Linear), lin
    return lin


def quantize_model_(model: GAM, method: str) -> GAM:
    """Quantize a GAM model's projections, memory banks and head in place (in the model's current dtype)."""
    from gam_model.model import GAM  # the model module stays free of this one

    assert isinstance(model, GAM)
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if quantization_of(model) != "none":
        raise QuantizationError(f"the model is already quantized ({quantization_of(model)})")
    dtype = model.token_embedding.weight.dtype
    with torch.no_grad():
        for blk in model.block_list():
            gate, (f1, f2) = _full_precision(blk.gate), map(_full_precision, blk.ffn_linears())
            blk.gate = QuantLinear.of(gate.weight, gate.bias, method, dtype)
            blk.ffn[0] = QuantLinear.of(f1.weight, f1.bias, method, dtype)
            blk.ffn[2] = QuantLinear.of(f2.weight, f2.bias, method, dtype)
            memory = blk.memory_bank
            assert not isinstance(memory, QuantMemory)
            del blk.memory_bank  # the Parameter goes; a module of the same name takes its place
            blk.memory_bank = QuantMemory.of(memory, method, dtype)
        model.head = QuantLinear.of(model.token_embedding.weight, None, method, dtype)
        model.token_embedding = QuantEmbedding(model.head)  # still tied: the full-precision table goes
    return model


def quantized_skeleton_(model: GAM, method: str, tied: bool = True) -> GAM:
    """Swap in empty quantized modules of the right shapes, for loading a pre-quantized state dict into.

    tied: the lookup reads the head's rows (QuantEmbedding); False for checkpoints written before the tie, which
    keep a full-precision token_embedding.weight beside the head's rows (`tied_embedding`).
    """
    from gam_model.model import GAM

    assert isinstance(model, GAM)
    dtype, store = model.token_embedding.weight.dtype, STORAGE[method]

    def linear(proj: nn.Linear | QuantLinear) -> QuantLinear:
        lin = _full_precision(proj)
        n, k = lin.weight.shape
        bias = None if lin.bias is None else torch.empty(n, dtype=dtype)
        return QuantLinear(torch.empty(n, k, dtype=store), torch.empty(n, dtype=dtype), bias)

    for blk in model.block_list():
        f1, f2 = blk.ffn_linears()
        blk.gate, blk.ffn[0], blk.ffn[2] = linear(blk.gate), linear(f1), linear(f2)
        assert not isinstance(blk.memory_bank, QuantMemory)
        s, c = blk.memory_bank.shape
        del blk.memory_bank
        blk.memory_bank = QuantMemory(torch.empty(s, c, dtype=store), torch.empty(s, dtype=dtype))
    model.head = linear(model.head)  # untied from the full-precision table by the swap
    if tied:
        model.token_embedding = QuantEmbedding(model.head)
    return model


def tied_embedding(stored: Mapping[str, Any]) -> bool:
    """Whether a pre-quantized checkpoint's lookup reads the head's rows (its `quantization` entry says
    "embedding": "tied"); entries written before the tie have no "embedding" key and a full-precision table."""
    return stored.get("embedding") == "tied"


def quantization_of(model: nn.Module) -> str:
    """'none', 'int8' or 'fp8': how the model's head (and so every projection) is stored."""
    head = getattr(model, "head", None)
    return NAME[head.qweight.dtype] if isinstance(head, QuantLinear) else "none"


def kernel_of(method: str, device: torch.device) -> str:
    """How `qmm` runs `method` on `device` (for the start-up log)."""
    if method == "fp8":
        return "torch._scaled_mm, e4m3 weights and per-row e4m3 activations"
    if device.type == "cpu":
        return "aten._weight_int8pack_mm"
    return "int8 weights cast to the activation dtype inside the matmul (fused by torch.compile, else per call)"


def default_dtype(device: torch.device, method: str) -> torch.dtype:
    """The activation dtype of `--dtype auto`: bf16 on CUDA or with quantized weights (the int8 CPU kernel's fast
    path), float32 on CPU otherwise (exact reference logits)."""
    return torch.bfloat16 if device.type == "cuda" or method in METHODS else torch.float32


def resolve(
    requested: str, stored: Mapping[str, Any] | None, dtype: torch.dtype | None, device: torch.device
) -> tuple[str, torch.dtype]:
    """(method, activation dtype) to serve, or a QuantizationError that says why the combination cannot be served.

    requested: --quantize (auto, none, int8, fp8); stored: the checkpoint's `quantization` entry (pre-quantized by
    gam-quantize) or None; dtype: --dtype (None = auto).
    """
    if requested not in CHOICES:
        raise QuantizationError(f"--quantize must be one of {', '.join(CHOICES)}, got {requested!r}")
    dt_name = {v: k for k, v in DTYPE_NAMES.items()}
    if stored is not None:
        method, made_for = stored.get("method"), DTYPE_NAMES.get(str(stored.get("dtype")))
        if method not in METHODS or made_for is None or stored.get("embedding") not in (None, "tied"):
            raise QuantizationError(f"the checkpoint's quantization entry is not understood: {dict(stored)!r}")
        if requested not in ("auto", method):
            raise QuantizationError(
                f"the checkpoint is pre-quantized to {method} (gam-quantize) and can only be served as {method}: "
                f"drop --quantize or pass --quantize {method}; to serve it as {requested}, load the original "
                "full-precision checkpoint"
            )
        if dtype is not None and dtype != made_for:
            raise QuantizationError(
                f"the checkpoint is pre-quantized for {dt_name[made_for]} activations (its scales and full-precision "
                f"tensors are stored in {dt_name[made_for]}); --dtype {dt_name[dtype]} would serve the same quantized "
                f"weights, no closer to the original model: pass --dtype {dt_name[made_for]} (or auto), or quantize "
                f"the original checkpoint at load (--quantize {method} --dtype {dt_name[dtype]})"
            )
        dtype = made_for
    else:
        method = "none" if requested == "auto" else requested
    dtype = dtype or default_dtype(device, method)
    if method == "fp8":
        if device.type != "cuda":
            raise QuantizationError(
                f"--quantize fp8 needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper or newer); the device "
                f"is {device.type}: use --quantize int8"
            )
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationError(
                f"--quantize fp8 needs compute capability 8.9+ (torch._scaled_mm), this GPU has {cap[0]}.{cap[1]}: "
                "use --quantize int8"
            )
        if dtype != torch.bfloat16:
            raise QuantizationError(
                f"--quantize fp8 computes in bfloat16 (torch._scaled_mm's row-wise scaling), not {dt_name[dtype]}: "
                "pass --dtype bfloat16 (or auto)"
            )
    return method, dtype


def describe(method: str, dtype: torch.dtype) -> dict[str, str]:
    """The `quantization` entry of a pre-quantized checkpoint's config.json."""
    return {
        "method": method,
        "dtype": str(dtype).removeprefix("torch."),
        "scheme": "symmetric, per output channel, weights only"
        + (" (activations per row, on the fly)" if method == "fp8" else ""),
        "quantized": "blocks.*.gate, blocks.*.memory_bank, blocks.*.ffn.0, blocks.*.ffn.2, head",
        "embedding": "tied",  # the token lookup dequantizes the head's rows; no token_embedding.weight is stored
    }
