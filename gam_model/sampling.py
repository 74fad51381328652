"""Batched next-token sampling with per-row parameters (DESIGN 1.6).

Per step, for a batch of rows each with its own SamplingParams:

1. the row's logit bias (OpenAI `logit_bias`: added to the raw logits), then penalties on the float32 logits: repetition (HF/TGI: divide positive logits, multiply negative ones, over
   prompt + generated tokens), then frequency/presence (OpenAI: subtract f*count + p*[count>0], generated only);
2. greedy rows take the argmax of the penalised logits;
3. sampling rows divide by their temperature, then mask by top-k, top-p and typical-p (in that order, each on
   the distribution renormalised after the previous mask, as HF/TGI warpers do), and draw by inverse CDF with one
   uniform from the row's own seeded random stream.

Logprobs (chosen token and top-n alternatives) are the log-softmax of the logits after penalties and
temperature, before the top-k/top-p/typical truncation (the temperature is taken as 1 for greedy rows). So an
alternative outside the nucleus still gets a finite logprob; this is the distribution TGI reports for
`details.tokens[].logprob` when no truncation is set.
The top-n come best first, equal logprobs by lower token id (`top_n_ranked`), so a row's alternatives are the same
whatever top-n its neighbours ask for.

Batch invariance: every operation is row-wise (per-row thresholds, row-local prefix sums and reductions) and
each row's randomness comes only from its own stream, so a seeded row draws the same tokens whatever its
neighbours are. Row-wise is not enough for bit-identical results: a generic reduction's order within a row may
depend on how many rows there are (CUDA's reduce kernel sizes its thread blocks by the number of rows; CPU
reductions split a lone long row across threads; CUDA scans a single row with another algorithm than a batch).
So the float sums here are prefix sums of one row-wise kind (`row_cumsum`) and the normaliser comes from
log_softmax (one fixed per-row kernel), and a row's tokens and logprobs are bit-identical whatever its
neighbours (tests/gam_model/test_deterministic.py). Whether the logits themselves are is the decode path's
business (`Decoder(deterministic=True)`).
"""

from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gam_model.device import to_device

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64-1; JSON clients are safer below 2**63
F32_MIN = 2.0**-149  # the smallest positive float32 (subnormal)
TIE_ROOM = 16  # top_n_ranked: entries past the n that a tie at the n-th value may take before whole rows are ranked


@dataclass
class SamplingParams:
    """Per-request sampling parameters (TGI `parameters` / OpenAI completion fields)."""

    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # HF/TGI semantics, over prompt + generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    presence_penalty: float = 0.0
    do_sample: bool = True  # False -> greedy unless a warper is set (TGI's rule, see `greedy`)
    seed: int | None = None  # None -> a random seed is drawn and recorded in SequenceSampler.seed
    top_n_tokens: int = 0  # how many top alternatives (id, logprob) to return per step
    logit_bias: dict[int, float] | None = None  # OpenAI: token id -> bias in [-100, 100] added to its logit

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range value (NaN and infinities included)."""

        def num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v: Any = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ValueError(f"{name} must be in {lb}{lo}, {hi}{hb}, got {v!r}")

        def integer(name: str, lo: int, hi: int) -> None:
            v: Any = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        num("temperature", 0.0, 100.0)
        integer("top_k", 0, 2**31 - 1)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("typical_p", 0.0, 1.0, lo_open=True)
        num("repetition_penalty", 0.0, 100.0, lo_open=True)
        num("frequency_penalty", -2.0, 2.0)
        num("presence_penalty", -2.0, 2.0)
        integer("top_n_tokens", 0, 2**31 - 1)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a boolean, got {self.do_sample!r}")
        if self.seed is not None:
            integer("seed", 0, MAX_SEED)
        for tid, b in (self.logit_bias or {}).items():
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tid!r}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {tid}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or do_sample False with no warper set (TGI: any warper turns sampling on)."""
        if self.temperature == 0:
            return True
        warpers = self.temperature != 1.0 or self.top_k != 0 or self.top_p < 1.0 or self.typical_p < 1.0
        return not self.do_sample and not warpers


class SequenceSampler:
    """Per-sequence sampling state, made at admission: params, the seeded generator and penalty counts."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device | str = "cpu"
    ) -> None:
        params.validate()
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.seed: int = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        # the row's own random stream (host side: one draw per step, whatever the device); None when greedy
        self.generator: random.Random | None = None if params.greedy else random.Random(self.seed)
        self.generated = 0
        # penalty state lives on the device, allocated only when the row uses it
        self.seen: Tensor | None = None  # (V,) bool, prompt + generated tokens (repetition penalty)
        self.counts: Tensor | None = None  # (V,) float32, generated-token counts (frequency/presence)
        # logit bias, sparse: the biased ids and their values, host lists (a dense (V,) row per request would cost a
        # (B, V) stack and add every step for a handful of entries; a tensor per row, a device op per row per step)
        self.bias: tuple[list[int], list[float]] | None = None
        if params.logit_bias:
            if max(params.logit_bias) >= vocab_size:
                raise ValueError(
                    f"logit_bias has token id {max(params.logit_bias)} >= the vocabulary size {vocab_size}"
                )
            ids = sorted(params.logit_bias)
            self.bias = (ids, [float(params.logit_bias[i]) for i in ids])
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[to_device(torch.tensor(ids), self.device)] = True
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)

    def observe(self, token_id: int | Tensor) -> None:
        """Record a generated token (for the penalties): an id, or a (1,) tensor on the penalty state's device (the
        batch core's: the host never waits for the device)."""
        self.generated += 1
        ids = token_id if isinstance(token_id, Tensor) else torch.tensor([token_id], device=self.device)  # (1,)
        if self.seen is not None:
            self.seen.index_fill_(0, ids, True)
        if self.counts is not None:
            self.counts.index_add_(0, ids, torch.ones(1, device=self.device))


@dataclass
class SampleOutput:
    """Result of one sampling step for a batch of B rows."""

    tokens: Tensor  # (B,) long
    logprobs: Tensor  # (B,) float32, logprob of the chosen token
    top_ids: Tensor  # (B, N) long, N = max top_n_tokens in the batch (0 if none); sorted by logprob, descending
    top_logprobs: Tensor  # (B, N) float32


def _column(rows: list[SequenceSampler], attr: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-row parameter as a (B, 1) tensor."""
    return to_device(torch.tensor([[float(getattr(r.params, attr))] for r in rows], dtype=dtype), device)


def apply_penalties(logits: Tensor, rows: list[SequenceSampler]) -> Tensor:
    """Logit bias, then repetition, frequency and presence penalties; returns new logits (B, V) (input untouched)."""
    V = logits.shape[-1]
    dev = logits.device
    biased = [(i, r.bias) for i, r in enumerate(rows) if r.bias is not None]
    if biased:  # the same float add as a dense bias row, at the biased entries only (each (row, id) once)
        row_idx = to_device(torch.tensor([i for i, (ids, _) in biased for _ in ids]), dev)  # (n,)
        col_idx = to_device(torch.tensor([t for _, (ids, _) in biased for t in ids]), dev)  # (n,)
        # float32 values, as a dense float32 bias row would hold them
        values = to_device(torch.tensor([v for _, (_, vs) in biased for v in vs], dtype=torch.float32), dev)  # (n,)
        logits = logits.index_put((row_idx, col_idx), values.to(logits.dtype), accumulate=True)  # (B, V), a new tensor
    if any(r.seen is not None for r in rows):
        none = torch.zeros(V, dtype=torch.bool, device=dev)
        seen = torch.stack([r.seen if r.seen is not None else none for r in rows])  # (B, V)
        rp = _column(rows, "repetition_penalty", dev, logits.dtype)  # (B, 1)
        # a tiny penalty (1e-300 is 0 in float32) would send a seen logit to +inf, whose softmax is NaN: the largest
        # float stands in for it (the seen tokens that overflow tie)
        boosted = (logits / rp).clamp(max=torch.finfo(logits.dtype).max)
        logits = torch.where(seen, torch.where(logits > 0, boosted, logits * rp), logits)
    if any(r.counts is not None for r in rows):
        zero = torch.zeros(V, dtype=logits.dtype, device=dev)
        counts = torch.stack([r.counts if r.counts is not None else zero for r in rows])  # (B, V)
        fp = _column(rows, "frequency_penalty", dev, logits.dtype)  # (B, 1)
        pp = _column(rows, "presence_penalty", dev, logits.dtype)  # (B, 1)
        logits = logits - fp * counts - pp * (counts > 0).to(logits.dtype)
    return logits


def truncation_mask(scaled: Tensor, rows: list[SequenceSampler]) -> Tensor:
    """Top-k, then top-p, then typical-p with per-row thresholds; returns keep (B, V) bool.

    Each step keeps the tokens whose logit is >= a per-row threshold (so tokens tied with the last kept one are
    kept too, as HF's top-k does), computed on the distribution renormalised after the previous step. Only
    the head of each row is sorted (torch.topk) unless that head holds too little mass for top-p.
    """
    B, V = scaled.shape
    dev = scaled.device
    keep = torch.ones(B, V, dtype=torch.bool, device=dev)
    ks = [r.params.top_k if 0 < r.params.top_k < V else 0 for r in rows]
    if any(ks):
        kth = scaled.topk(max(ks), dim=-1).values  # (B, kmax) sorted descending
        idx = to_device(torch.tensor([[max(k, 1) - 1] for k in ks]), dev)  # (B, 1)
        thr = kth.gather(1, idx).masked_fill(to_device(torch.tensor([[k == 0] for k in ks]), dev), -math.inf)
        keep = scaled >= thr  # (B, V)
    p_rows = [i for i, r in enumerate(rows) if r.params.top_p < 1.0]
    if p_rows:
        pi = to_device(torch.tensor(p_rows), dev)
        sub = scaled.index_select(0, pi).masked_fill(~keep.index_select(0, pi), -math.inf)  # (P, V)
        top_p = _column([rows[i] for i in p_rows], "top_p", dev, scaled.dtype)  # (P, 1)
        keep[pi] &= sub >= top_p_threshold(sub, top_p)
    t_rows = [i for i, r in enumerate(rows) if r.params.typical_p < 1.0]
    if t_rows:
        ti = to_device(torch.tensor(t_rows), dev)
        sub = scaled.index_select(0, ti).masked_fill(~keep.index_select(0, ti), -math.inf)  # (T, V)
        keep[ti] &= typical_mask(sub, _column([rows[i] for i in t_rows], "typical_p", dev, scaled.dtype))
    return keep


TOP_P_HEAD = 256  # top-p first looks at this many best tokens per row; a row whose head holds < p sorts fully


def row_cumsum(x: Tensor) -> Tensor:
    """Prefix sums along the last dim of x (R, V), each row's bits the same whatever R.

    CUDA scans a tensor that is a single row with another algorithm (cub) than rows of a batch, so one row is
    scanned as two.
    """
    if x.shape[0] == 1:
        return x.expand(2, -1).cumsum(dim=-1)[:1]
    return x.cumsum(dim=-1)


def row_sum(x: Tensor) -> Tensor:
    """Sum along the last dim of x (R, V) -> (R, 1), each row's bits the same whatever R: the last prefix sum.

    x.sum(-1) is the generic reduction, whose order within a row depends on the number of rows (see above).
    """
    return row_cumsum(x)[:, -1:]


def row_logsumexp(x: Tensor) -> Tensor:
    """log(sum(exp(x))) per row (R, 1) from log_softmax's per-row kernel: max(x) - max(log_softmax(x)).

    torch.logsumexp sums with the generic reduction too.
    """
    return x.amax(dim=-1, keepdim=True) - x.log_softmax(dim=-1).amax(dim=-1, keepdim=True)


ARGMAX_BLOCK = 64  # row_argmax: entries per block
ARGMAX_MIN_ROWS = 4  # fewer rows: torch's argmax, whose one call costs less than row_argmax's few


def row_argmax(x: Tensor) -> Tensor:
    """x.argmax(dim=-1) of x (R, V), the same indices (the first maximum; NaN counts as the maximum), faster on CPU.

    torch's CPU argmax walks a row one element at a time (2.5 ms for 256 x 8192 floats on the dev machine, 18x its
    amax); here each row's blocks of ARGMAX_BLOCK entries get a vectorised amax, then argmax runs over the block maxima
    (the first block holding the maximum) and inside that block, and the last V % ARGMAX_BLOCK entries are compared
    apart. CUDA's argmax is a parallel kernel already: used as is there, and for a few rows.
    """
    R, V = x.shape
    V0 = V - V % ARGMAX_BLOCK
    if x.device.type != "cpu" or R < ARGMAX_MIN_ROWS or V0 == 0:
        return x.argmax(dim=-1)
    blocks = x[:, :V0].view(R, V0 // ARGMAX_BLOCK, ARGMAX_BLOCK)  # a view: rows split into blocks
    block_max = blocks.amax(dim=-1)  # (R, nb), NaN where a block holds one
    best = block_max.argmax(dim=-1)  # (R,) the first block holding the row's maximum
    idx = best * ARGMAX_BLOCK + blocks[torch.arange(R), best].argmax(dim=-1)  # (R,)
    if V0 < V:  # the tail wins only with a greater value, or a NaN where the blocks have none
        tail = x[:, V0:]
        t_idx = tail.argmax(dim=-1)  # (R,)
        t_val = tail.gather(1, t_idx.unsqueeze(1)).squeeze(1)
        b_val = block_max.gather(1, best.unsqueeze(1)).squeeze(1)
        idx = torch.where((t_val > b_val) | (t_val.isnan() & ~b_val.isnan()), t_idx + V0, idx)
    return idx


def top_p_threshold(logits: Tensor, top_p: Tensor) -> Tensor:
    """Per-row logit threshold (R, 1) of the smallest prefix of tokens, best first, whose mass reaches top_p (R, 1).

    Row-local and exact: the head path and the full-sort path compute the same prefix sums, so a row's result
    does not depend on which path its neighbours need.
    """
    R, V = logits.shape
    lse = row_logsumexp(logits)  # (R, 1) normaliser of the (masked) row
    out = torch.empty(R, 1, dtype=logits.dtype, device=logits.device)
    head = logits.topk(min(TOP_P_HEAD, V), dim=-1).values  # (R, H) sorted descending
    thr, covered = _prefix_threshold(head, lse, top_p)
    out.copy_(thr)
    if not bool(covered.all()):  # on CUDA the host waits here for the device: top-p rows cost an overlapped launch
        rest = (~covered).nonzero().squeeze(1)  # rows whose head mass < top_p
        full = logits.index_select(0, rest).sort(dim=-1, descending=True).values  # (r, V)
        out[rest] = _prefix_threshold(full, lse.index_select(0, rest), top_p.index_select(0, rest))[0]
    return out


def _prefix_threshold(sorted_logits: Tensor, lse: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold (R, 1) from logits sorted descending (R, H); covered (R,) = whether those H tokens reach top_p."""
    probs = (sorted_logits - lse).exp()  # (R, H)
    cum = row_cumsum(probs)
    n = ((cum - probs) < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # tokens kept: mass before each < p
    return sorted_logits.gather(1, n - 1), cum[:, -1] >= top_p.squeeze(1)


def typical_mask(logits: Tensor, mass: Tensor) -> Tensor:
    """Locally typical sampling (Meister et al. 2022, HF TypicalLogitsWarper): keep the tokens whose surprisal is
    closest to the entropy until their mass reaches `mass` (B, 1)."""
    logp = logits.log_softmax(dim=-1)  # (B, V)
    p = logp.exp()
    ent = -row_sum((p * logp).nan_to_num())  # (B, 1) entropy; 0 * -inf -> 0
    shifted = (-logp - ent).abs()  # (B, V); masked tokens -> +inf, sorted last
    order = shifted.argsort(dim=-1, stable=True)  # (B, V)
    sp = p.gather(1, order)
    before = row_cumsum(sp) - sp
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    keep_sorted = (before < mass) | (rank == 0)
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def draw(probs: Tensor, rows: list[SequenceSampler]) -> Tensor:
    """Inverse-CDF draw per row (B,) from probs (B, V), with one uniform from each row's own generator.

    The uniforms come from host-side generators (one Python call per row, no device launch per row), and the
    CDF is a row-wise float64 prefix sum, so a row's draw depends only on its own seed and probabilities.
    """
    u = torch.tensor([r.generator.random() for r in rows], dtype=torch.float64)  # type: ignore[union-attr]
    cdf = row_cumsum(probs.double())  # (B, V)
    total = cdf[:, -1:]
    target = torch.minimum(
        to_device(u, probs.device).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    # right=True: the first index whose cdf exceeds the target, which always has probability > 0
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def top_n_ranked(logprobs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n best (logprobs, ids) (R, n) of each row of logprobs (R, V): best first, equal values by lower id.

    torch.topk keeps and orders tied entries differently for different n, and a batch asks for its largest top-n, so
    without a fixed tie order a row's alternatives depended on its neighbours' (ties are common with bf16 logits).
    """
    m = min(n + TIE_ROOM, logprobs.shape[-1])
    vals, ids = logprobs.topk(m, dim=-1)  # (R, m) descending, ties in no fixed order
    ids, by_id = ids.sort(dim=-1)  # (R, m) by id, then stably by value: equal values keep id order
    vals, by_val = vals.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, by_val)
    # rows whose tie at the n-th value runs past the m (which tied ids topk kept is arbitrary): rank the whole row
    tied = (vals[:, n - 1] == vals[:, -1]).nonzero().squeeze(1) if m < logprobs.shape[-1] else vals.new_zeros(0)
    if tied.numel():
        whole_vals, whole_ids = logprobs.index_select(0, tied).sort(dim=-1, descending=True, stable=True)  # (T, V)
        vals.index_copy_(0, tied, whole_vals[:, :m])
        ids.index_copy_(0, tied, whole_ids[:, :m])
    return vals[:, :n], ids[:, :n]


@torch.inference_mode()
def sample(logits: Tensor, rows: list[SequenceSampler]) -> SampleOutput:
    """Choose the next token for each row of logits (B, V) float32 with that row's parameters."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
    B, V = logits.shape
    dev = logits.device
    logits = apply_penalties(logits.float(), rows)  # (B, V)
    greedy = [r.params.greedy for r in rows]
    # the clamp keeps a temperature below float32's range (1e-300 is 0 in float32) from dividing the max by 0 (0 / 0
    # is NaN): the smallest positive float32 stands in for it; one float32 holds (1e-39, subnormal) is kept
    temps = [1.0 if g else max(float(r.params.temperature), F32_MIN) for g, r in zip(greedy, rows, strict=True)]
    # shifted by the row max first (softmax is shift-invariant): a tiny temperature then sends the other logits to
    # -inf, never the best one to +inf (l / 1e-39 overflows, and softmax of +inf is NaN)
    scaled = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), max 0
    if any(t != 1.0 for t in temps):  # dividing by 1 is exact: skipped when no row has another temperature
        scaled = scaled / to_device(torch.tensor(temps).unsqueeze(1), dev)  # (B, 1)
    logprobs_all = scaled.log_softmax(dim=-1)  # (B, V) the reported distribution
    tokens = row_argmax(logits)  # (B,)
    sampled = [i for i, g in enumerate(greedy) if not g]
    if sampled:
        srows = [rows[i] for i in sampled]
        idx = to_device(torch.tensor(sampled), dev)
        sub = scaled.index_select(0, idx)  # (S, V)
        needs_mask = any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.typical_p < 1.0 for r in srows)
        if needs_mask:
            sub = sub.masked_fill(~truncation_mask(sub, srows), -math.inf)
        tokens = tokens.index_copy(0, idx, draw(sub.softmax(dim=-1), srows))
    chosen = logprobs_all.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
    n = min(max(r.params.top_n_tokens for r in rows), V)
    if n > 0:
        top_logprobs, top_ids = top_n_ranked(logprobs_all, n)  # (B, N) best first
    else:
        top_logprobs, top_ids = logprobs_all.new_zeros(B, 0), tokens.new_zeros(B, 0)
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)
