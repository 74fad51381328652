"""gam-generate's loop: prompts through the batch core (gam_model.batch), text made here.

Prompts share one Decoder: waiting prompts are admitted while slots are free, every running row advances one token
per step, and a row's slot is freed as soon as it finishes (the server's engine core drives the same BatchCore).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gam_model.batch import BatchCore, SequenceSpec
from gam_model.decode import Decoder
from gam_model.detokenize import Detokenizer, incremental_detokenizer
from gam_model.sampling import SamplingParams
from gam_model.stopping import StopChecker, advance
from gam_model.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """One prompt's output."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos_token" | "stop_sequence" | "length"
    seed: int
    prompt_token_ids: list[int]
    matched_stop: str | None = None
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, if top_n_tokens > 0


@dataclass
class _Text:
    """The consumer side of one row: its text step and what it accumulated."""

    detok: Detokenizer
    stop: StopChecker
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def _per_prompt(value, n: int, name: str) -> list:
    """Broadcast a single value to n prompts, or check a per-prompt list has n entries."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return value
    return [value] * n


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids; an empty encoding starts from the bos (else eos) token, as there is nothing to condition on."""
    ids = tokenizer.encode(prompt)
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("empty prompt and the tokenizer has no bos/eos token to start from")
        ids = [start]
    return ids


def generate(
    decoder: Decoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | list[SamplingParams],
    max_new_tokens: int | list[int],
    stop: list[str] | list[list[str]] | None = None,
    stop_token_ids: set[int] | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt, batched in one Decoder; on_text(prompt index, text) streams final text."""
    n = len(prompts)
    plist = _per_prompt(params, n, "params")
    mlist = _per_prompt(max_new_tokens, n, "max_new_tokens")
    slist: list[list[str]]  # one stop list per prompt (an isinstance on stop[0] does not narrow stop's type)
    if stop is None:
        slist = [[]] * n
    elif stop and isinstance(stop[0], list):
        slist = cast("list[list[str]]", stop)
    else:
        slist = [cast("list[str]", stop)] * n
    if len(slist) != n:
        raise ValueError(f"stop: {len(slist)} lists for {n} prompts")
    for p in plist:
        p.validate()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    core = BatchCore(decoder, tokenizer)
    results: list[GenerationResult | None] = [None] * n
    waiting = deque(range(n))
    rows: dict[int, _Text] = {}
    while waiting or len(core):
        while waiting and core.free_slots > 0:
            i = waiting.popleft()
            core.add(i, SequenceSpec(encoded[i], plist[i], mlist[i], slist[i], stop_token_ids or set()))
            stopper = StopChecker(slist[i], tokenizer.eos_token_id, stop_token_ids or set(), mlist[i])
            rows[i] = _Text(incremental_detokenizer(tokenizer, encoded[i]), stopper)
        out = core.step()
        if out.failed:
            raise RuntimeError(out.failed[0][1])
        for j, (i, tok, lp) in enumerate(
            zip(out.keys.tolist(), out.tokens.tolist(), out.logprobs.tolist(), strict=True)
        ):
            r = rows[i]
            r.token_ids.append(tok)
            r.logprobs.append(lp)
            if j in out.top:
                r.top_tokens.append(list(zip(*out.top[j], strict=True)))
            text, reason = advance(r.detok, r.stop, tok)
            if text:
                r.text.append(text)
                if on_text is not None:
                    on_text(i, text)
            fin = out.finished.get(j)
            if fin is None:
                continue
            if reason != fin.reason:  # one text step, two places: they cannot disagree unless a bug says so
                raise RuntimeError(f"finish reasons disagree: {reason} (text) vs {fin.reason} (batch core)")
            del rows[i]
            results[i] = GenerationResult(
                text="".join(r.text),
                token_ids=r.token_ids,
                logprobs=r.logprobs,
                finish_reason=fin.reason,
                seed=fin.seed,
                prompt_token_ids=encoded[i],
                matched_stop=r.stop.matched_stop,
                top_tokens=r.top_tokens,
            )
    return [r for r in results if r is not None]
