"""The one synchronous batch core: admit, step, sample and retire sequences over a Decoder's slot pool.

Used by `generate` (gam-generate) and by the server's engine core process (server/core.py), which adds the queue,
deadlines, prompt logprobs, stats and IPC around it. One `step()`:
  1. steps the running sequences in one forward call and prefills those added since the last step in another;
  2. samples one token for every row in one batched call;
  3. checks the stop conditions over the whole batch at once: eos and length are array compares; per-row Python
     runs only for rows that need it (stop token ids, stop strings, penalties, top-n alternatives);
  4. frees the slots of finished rows and returns the step's results as columns (StepOutput).

Text is not made here: the consumer detokenizes with `gam_model.stopping.advance_token`, where it costs least (the
server's HTTP frontend). Rows with stop strings are the exception: whether they finished depends on their text, so
they are detokenized here too, with the same function, and so reach the same verdict as the consumer. A failed
forward or sampling call ends only that call's sequences (StepOutput.failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from gam_model.decode import Decoder
from gam_model.detokenize import IncrementalDetokenizer
from gam_model.sampling import SamplingParams, SequenceSampler, sample
from gam_model.stopping import EOS_TOKEN, LENGTH, StopChecker, advance_token
from gam_model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# finish codes of the per-row checks (0 = still running)
RUNNING, EOS, STOP, LEN, FAILED = 0, 1, 2, 3, -1
REASONS = {EOS: EOS_TOKEN, STOP: "stop_sequence", LEN: LENGTH}
CODES = {v: k for k, v in REASONS.items()}


@dataclass
class SequenceSpec:
    """What one sequence generates: its prompt ids, sampling parameters and stop conditions."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)


class Finished(NamedTuple):
    """A row that ended normally in this step."""

    reason: str  # eos_token, stop_sequence, length (TGI names)
    generated: int  # tokens it generated, this one included
    seed: int  # the seed of its random stream (drawn when not given; greedy rows never use it)


@dataclass
class StepOutput:
    """One step's results as columns over its rows (the sequences that got a token), in row order."""

    keys: np.ndarray  # (B,) int64 sequence keys
    tokens: np.ndarray  # (B,) int64 sampled token ids
    logprobs: np.ndarray  # (B,) float32 logprob of each sampled token
    finished: dict[int, Finished] = field(default_factory=dict)  # row -> how it ended (its slot is free)
    top: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # row -> top-n (rows that asked)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (key, message): ended by a failure (slot free)
    stepped: int = 0  # rows [0, stepped) were running (their previous token came from the previous step)
    prefilled: int = 0  # rows [stepped, stepped + prefilled) were prefilled in this step
    forward_s: float = 0.0  # wall seconds in the forward calls
    sample_s: float = 0.0  # wall seconds in the sampling call (host transfer included)

    @staticmethod
    def empty() -> StepOutput:
        return StepOutput(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


@dataclass(eq=False)
class _Seq:
    key: int
    spec: SequenceSpec
    slot: int
    sampler: SequenceSampler
    stop_ids: frozenset[int]
    texts: tuple[IncrementalDetokenizer, StopChecker] | None  # only for rows with stop strings
    penalties: bool


class BatchCore:
    """Sequences by key over one Decoder: `add` them while slots are free, `step` them all, `remove` to cancel."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.vocab_size = decoder.config.vocab_size
        self._seqs: dict[int, _Seq] = {}
        self._active: list[_Seq] = []  # prefilled: stepped by the next step
        self._new: list[_Seq] = []  # added: prefilled by the next step
        n = decoder.state.num_slots + 1  # slot ids (the scratch slot included)
        self._pending = np.zeros(n, np.int64)  # last sampled token per slot, fed by the next step
        self._generated = np.zeros(n, np.int64)
        self._max_new = np.zeros(n, np.int64)
        self._special = np.zeros(n, bool)  # the slot's row needs per-row work after sampling
        self.before_step: Callable[[], None] | None = None  # test hook: raising fails the step call (fault injection)

    # -- sequences -----------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.decoder.state.free_slots

    def __len__(self) -> int:
        return len(self._seqs)

    def add(self, key: int, spec: SequenceSpec) -> None:
        """Give a sequence a slot; it is prefilled by the next step. Raises ValueError for a spec it cannot run."""
        if key in self._seqs:
            raise ValueError(f"sequence {key} is already running")
        if spec.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {spec.max_new_tokens}")
        sampler = SequenceSampler(spec.params, spec.prompt_ids, self.vocab_size, self.decoder.device)
        texts = None
        if spec.stop:
            stopper = StopChecker(spec.stop, self.eos, spec.stop_token_ids, spec.max_new_tokens)
            texts = (IncrementalDetokenizer(self.tokenizer, spec.prompt_ids), stopper)
        penalties = sampler.seen is not None or sampler.counts is not None
        stop_ids = frozenset(spec.stop_token_ids)
        seq = _Seq(key, spec, self.decoder.allocate(), sampler, stop_ids, texts, penalties)
        self._special[seq.slot] = bool(stop_ids) or texts is not None or penalties or spec.params.top_n_tokens > 0
        self._generated[seq.slot] = 0
        self._max_new[seq.slot] = spec.max_new_tokens
        self._seqs[key] = seq
        self._new.append(seq)

    def remove(self, key: int) -> int:
        """End a sequence now (cancelled, timed out) and free its slot; returns the tokens it generated."""
        seq = self._seqs.pop(key)
        if seq in self._new:
            self._new.remove(seq)
        else:
            self._active.remove(seq)
        self.decoder.free(seq.slot)
        return int(self._generated[seq.slot])

    def _drop(self, seqs: list[_Seq], message: str, out: StepOutput) -> None:
        for seq in seqs:
            del self._seqs[seq.key]
            self.decoder.free(seq.slot)
            out.failed.append((seq.key, message))

    # -- the step ------------------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Advance every sequence by one token (prefilling the new ones); see the module docstring."""
        active, new = self._active, self._new
        self._active, self._new = [], []
        out = StepOutput.empty()
        if not active and not new:
            return out
        t0 = time.perf_counter()
        parts: list[torch.Tensor] = []
        rows: list[_Seq] = []
        stepped = 0
        if active:
            try:
                if self.before_step is not None:
                    self.before_step()
                slots = [s.slot for s in active]
                parts.append(self.decoder.step(slots, torch.from_numpy(self._pending[slots])))  # (B, V)
                rows += active
                stepped = len(active)
            except Exception as e:
                log.exception("decode step failed for %d sequences", len(active))
                self._drop(active, f"decode step failed: {e}", out)
        if new:
            try:
                parts.append(self.decoder.prefill([s.slot for s in new], [s.spec.prompt_ids for s in new]))  # (P, V)
                rows += new
            except Exception as e:
                log.exception("prefill failed for %d sequences", len(new))
                self._drop(new, f"prefill failed: {e}", out)
        t1 = time.perf_counter()
        out.forward_s = t1 - t0
        if not rows:
            return out
        try:
            res = sample(torch.cat(parts) if len(parts) > 1 else parts[0], [s.sampler for s in rows])
            tokens = res.tokens.cpu().numpy()  # (B,) int64
            logprobs = res.logprobs.float().cpu().numpy()  # (B,) float32
            top_ids, top_lps = res.top_ids.cpu(), res.top_logprobs.cpu()
        except Exception as e:
            log.exception("sampling failed for %d sequences", len(rows))
            self._drop(rows, f"sampling failed: {e}", out)
            return out
        out.sample_s = time.perf_counter() - t1
        out.stepped, out.prefilled = stepped, len(rows) - stepped
        out.keys = np.fromiter((s.key for s in rows), np.int64, len(rows))
        out.tokens, out.logprobs = tokens, logprobs
        self._finish_checks(rows, out, top_ids, top_lps)
        return out

    def _finish_checks(self, rows: list[_Seq], out: StepOutput, top_ids: torch.Tensor, top_lps: torch.Tensor) -> None:
        tokens = out.tokens
        slots = np.fromiter((s.slot for s in rows), np.int64, len(rows))
        gen = self._generated[slots] + 1
        self._generated[slots] = gen
        self._pending[slots] = tokens
        # the whole batch at once: eos, then length (a stop token outranks the length limit, as in StopChecker)
        codes = np.where(gen >= self._max_new[slots], LEN, RUNNING)
        if self.eos is not None:
            codes[tokens == self.eos] = EOS
        # per-row work only where asked
        for i in np.flatnonzero(self._special[slots]).tolist():
            seq = rows[i]
            tok = int(tokens[i])
            try:
                if seq.penalties:
                    seq.sampler.observe(tok)
                n = seq.spec.params.top_n_tokens
                if n:
                    out.top[i] = (top_ids[i, :n].tolist(), top_lps[i, :n].tolist())
                if seq.texts is not None:  # stop strings: the consumer's own verdict, from the same text step
                    reason = advance_token(seq.texts[0], seq.texts[1], tok)[2]
                    codes[i] = CODES[reason] if reason is not None else RUNNING
                elif tok in seq.stop_ids:
                    codes[i] = EOS
            except Exception as e:  # this row alone fails
                log.exception("token handling failed for sequence %d", seq.key)
                codes[i] = FAILED
                out.failed.append((seq.key, f"token handling failed: {e}"))
        ended = np.flatnonzero(codes)
        if len(ended) == 0:
            self._active = rows
            return
        for i in ended.tolist():
            seq = rows[i]
            del self._seqs[seq.key]
            self.decoder.free(seq.slot)
            if codes[i] != FAILED:
                out.finished[i] = Finished(REASONS[int(codes[i])], int(gen[i]), seq.sampler.seed)
        self._active = [s for s, c in zip(rows, codes.tolist(), strict=True) if not c]
