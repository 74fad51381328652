"""The one synchronous batch core: admit, step, sample and retire sequences over a Decoder's slot pool.

Used by `generate` (gam-generate) and by the server's engine core process (server/core.py), which adds the queue,
deadlines, prompt logprobs, stats and IPC around it. One step is two halves:
  launch: step the running sequences in one forward call and prefill those added since the last step in another,
     then sample one token for every row in one batched call. The sampled ids stay where the model runs: they are
     the next step's inputs, and penalty rows record them there. On CUDA nothing here waits for the device (kernels
     are queued; the ids, logprobs and top-n are copied to pinned host memory behind them);
  collect: read a launch's results on the host and check the stop conditions over the whole batch at once: eos and
     length are array compares; per-row Python runs only for rows that need it (stop token ids, stop strings,
     top-n alternatives); free the slots of finished rows and return the results as columns (StepOutput).

`step()` launches, then collects. With `overlap` (SGLang's overlap scheduler), it launches step t+1 *before*
collecting step t, so the host's per-step work (finish checks, the caller's output and admission) runs while the
device computes the next step. A row that finished in step t is then stepped once more in t+1 (unless it had reached
its length limit, which is known at launch); that extra row is dropped when t+1 is collected, as is any row of a
sequence removed while its step was in flight. The results are the same tokens (bit-identical where the decode path
is batch-invariant, `Decoder(deterministic=True)`), one call later. On a CPU, where the forward runs on the host's
own cores, a launch is the whole computation: overlap only delays each step's output by one step (default: on
for CUDA, off elsewhere).

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
from torch import Tensor

from gam_model.decode import Decoder
from gam_model.detokenize import Detokenizer, incremental_detokenizer
from gam_model.device import to_device
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
    forward_s: float = 0.0  # wall seconds in the forward calls (on CUDA: queueing them; the device runs behind)
    sample_s: float = 0.0  # wall seconds in the sampling call and, when collected, waiting for the host copies

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
    texts: tuple[Detokenizer, StopChecker] | None  # only for rows with stop strings
    penalties: bool
    row: int = -1  # its row in the last launch: where its next input token is
    launched: int = 0  # tokens sampled or being sampled for it
    done: bool = False  # finished, failed or removed: a row of it still in flight is dropped when collected


@dataclass
class _Launch:
    """One launched step: its rows, and its results on their way to the host (ready once `copied` has passed)."""

    rows: list[_Seq]
    stepped: int  # rows [0, stepped) were stepped, the rest prefilled
    tokens: Tensor  # (B,) long on the host
    logprobs: Tensor  # (B,) float32 on the host
    top_ids: Tensor  # (B, N) long on the host
    top_logprobs: Tensor  # (B, N) float32 on the host
    copied: torch.cuda.Event | None  # CUDA: recorded after the device-to-host copies
    forward_s: float
    sample_s: float


class BatchCore:
    """Sequences by key over one Decoder: `add` them while slots are free, `step` them all, `remove` to cancel."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, *, overlap: bool | None = None) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.overlap = decoder.device.type == "cuda" if overlap is None else overlap  # None: where the device is async
        self.eos = tokenizer.eos_token_id
        self.vocab_size = decoder.config.vocab_size
        self._seqs: dict[int, _Seq] = {}
        self._new: list[_Seq] = []  # added: prefilled by the next launch
        self._last: list[_Seq] = []  # the rows of the last launch (some may be done since)
        self._last_tokens: Tensor | None = None  # (len(_last),) their sampled ids, on the model's device
        self._inflight: _Launch | None = None  # overlap: launched, not yet collected
        n = decoder.state.num_slots + 1  # slot ids (the scratch slot included)
        self._generated = np.zeros(n, np.int64)  # tokens collected per slot
        self._max_new = np.zeros(n, np.int64)
        self._special = np.zeros(n, bool)  # the slot's row needs per-row work when collected
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
            texts = (incremental_detokenizer(self.tokenizer, spec.prompt_ids), stopper)
        penalties = sampler.seen is not None or sampler.counts is not None
        stop_ids = frozenset(spec.stop_token_ids)
        seq = _Seq(key, spec, self.decoder.allocate(), sampler, stop_ids, texts, penalties)
        self._special[seq.slot] = bool(stop_ids) or texts is not None or spec.params.top_n_tokens > 0
        self._generated[seq.slot] = 0
        self._max_new[seq.slot] = spec.max_new_tokens
        self._seqs[key] = seq
        self._new.append(seq)

    def remove(self, key: int) -> int:
        """End a sequence now (cancelled, timed out) and free its slot; returns the tokens it generated."""
        seq = self._seqs.pop(key)
        if seq in self._new:
            self._new.remove(seq)
        self._end(seq)
        return int(self._generated[seq.slot])

    def _end(self, seq: _Seq) -> None:
        """Free its slot: a new sequence may take it at once (the device runs launches in order, so a step of this
        one still in flight touches the slot before the newcomer's prefill resets it)."""
        seq.done = True
        self.decoder.free(seq.slot)

    def _drop(self, seqs: list[_Seq], message: str, failed: list[tuple[int, str]]) -> None:
        for seq in seqs:
            del self._seqs[seq.key]
            self._end(seq)
            failed.append((seq.key, message))

    # -- the step ------------------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Launch the next step and collect one (with overlap: the previous launch); see the module docstring."""
        failed: list[tuple[_Seq, str]] = []
        launch = self._launch(failed)
        if self.overlap:
            launch, self._inflight = self._inflight, launch
        out = self._collect(launch) if launch is not None else StepOutput.empty()
        # a failed launch ends its sequences after the collect: a token of theirs still in flight is delivered first
        for seq, message in failed:
            if not seq.done:
                self._drop([seq], message, out.failed)
        return out

    def _launch(self, failed: list[tuple[_Seq, str]]) -> _Launch | None:
        """Queue the forward and sampling of every running sequence that may still need a token, and the prefill of
        the new ones; None when there is nothing to run. Sequences a failed call leaves out go to `failed`."""
        last, last_tokens = self._last, self._last_tokens
        active = [s for s in last if not s.done and s.launched < s.spec.max_new_tokens]
        new, self._new = self._new, []
        if not active and not new:
            return None
        t0 = time.perf_counter()
        parts: list[Tensor] = []
        rows: list[_Seq] = []
        if active:
            assert last_tokens is not None
            try:
                if self.before_step is not None:
                    self.before_step()
                idx = [s.row for s in active]  # ascending
                if idx[-1] == len(idx) - 1:  # the first rows of the last launch (the usual case): no gather
                    inputs = last_tokens[: len(idx)]
                else:
                    inputs = last_tokens.index_select(0, to_device(torch.tensor(idx), last_tokens.device))
                parts.append(self.decoder.step([s.slot for s in active], inputs))  # (B, V)
                rows += active
            except Exception as e:
                log.exception("decode step failed for %d sequences", len(active))
                failed += [(s, f"decode step failed: {e}") for s in active]
        stepped = len(rows)
        if new:
            try:
                parts.append(self.decoder.prefill([s.slot for s in new], [s.spec.prompt_ids for s in new]))  # (P, V)
                rows += new
            except Exception as e:
                log.exception("prefill failed for %d sequences", len(new))
                failed += [(s, f"prefill failed: {e}") for s in new]
        self._last, self._last_tokens = [], None
        if not rows:
            return None
        t1 = time.perf_counter()
        try:
            samplers = [s.sampler for s in rows]
            res = sample(torch.cat(parts) if len(parts) > 1 else parts[0], samplers)  # tokens (B,) on the device
            for i, s in enumerate(rows):
                s.row, s.launched = i, s.launched + 1
                if s.penalties:  # recorded where the ids are, before the next launch samples
                    s.sampler.observe(res.tokens[i : i + 1])
            # into pinned host memory behind the queued work (on the CPU these are the tensors themselves)
            tokens, logprobs = (
                res.tokens.to("cpu", non_blocking=True),
                res.logprobs.float().to("cpu", non_blocking=True),
            )
            top_ids, top_lps = res.top_ids.to("cpu", non_blocking=True), res.top_logprobs.to("cpu", non_blocking=True)
            copied = None
            if res.tokens.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record()
        except Exception as e:
            log.exception("sampling failed for %d sequences", len(rows))
            failed += [(s, f"sampling failed: {e}") for s in rows]
            return None
        self._last, self._last_tokens = rows, res.tokens
        return _Launch(rows, stepped, tokens, logprobs, top_ids, top_lps, copied, t1 - t0, time.perf_counter() - t1)

    def _collect(self, launch: _Launch) -> StepOutput:
        """A launch's results on the host, its rows of sequences ended since dropped, then the finish checks."""
        t0 = time.perf_counter()
        rows = launch.rows
        out = StepOutput.empty()
        try:
            if launch.copied is not None:
                launch.copied.synchronize()  # the only wait on the device
            tokens, logprobs = launch.tokens.numpy(), launch.logprobs.numpy()
        except Exception as e:  # an asynchronous device failure surfaces here
            log.exception("step failed for %d sequences", len(rows))
            self._drop([s for s in rows if not s.done], f"decode step failed: {e}", out.failed)
            return out
        top_ids, top_lps = launch.top_ids, launch.top_logprobs
        stepped = launch.stepped
        keep = [i for i, s in enumerate(rows) if not s.done]
        if len(keep) < len(rows):  # rows of sequences that ended after this launch
            rows = [rows[i] for i in keep]
            tokens, logprobs = tokens[keep], logprobs[keep]
            top_ids, top_lps = top_ids[keep], top_lps[keep]
            stepped = sum(1 for i in keep if i < launch.stepped)
        out.forward_s, out.sample_s = launch.forward_s, launch.sample_s + time.perf_counter() - t0
        if not rows:
            return out
        out.stepped, out.prefilled = stepped, len(rows) - stepped
        out.keys = np.fromiter((s.key for s in rows), np.int64, len(rows))
        out.tokens, out.logprobs = tokens, logprobs
        self._finish_checks(rows, out, top_ids, top_lps)
        return out

    def _finish_checks(self, rows: list[_Seq], out: StepOutput, top_ids: Tensor, top_lps: Tensor) -> None:
        tokens = out.tokens
        slots = np.fromiter((s.slot for s in rows), np.int64, len(rows))
        gen = self._generated[slots] + 1
        self._generated[slots] = gen
        # the whole batch at once: eos, then length (a stop token outranks the length limit, as in StopChecker)
        codes = np.where(gen >= self._max_new[slots], LEN, RUNNING)
        if self.eos is not None:
            codes[tokens == self.eos] = EOS
        # per-row work only where asked
        for i in np.flatnonzero(self._special[slots]).tolist():
            seq = rows[i]
            tok = int(tokens[i])
            try:
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
        for i in np.flatnonzero(codes).tolist():
            seq = rows[i]
            del self._seqs[seq.key]
            self._end(seq)
            if codes[i] != FAILED:
                out.finished[i] = Finished(REASONS[int(codes[i])], int(gen[i]), seq.sampler.seed)
