"""Stop conditions for one sequence: eos / stop token ids, stop strings (which may span tokens), max new tokens.

Finish reasons use TGI's names: "eos_token", "stop_sequence", "length" (OpenAI maps the first two to "stop").
"""

from __future__ import annotations

from gam_model.detokenize import Detokenizer

EOS_TOKEN, STOP_SEQUENCE, LENGTH = "eos_token", "stop_sequence", "length"


class StopChecker:
    """Feed each generated token and its new text; get back the text safe to emit and the finish reason.

    Text that could be the start of a stop string is held back until it is resolved. A matched stop string is
    not emitted, nor anything after it. An eos or stop token id ends the sequence and its own text is dropped
    (what was held back is released). Order of precedence in one step: stop token id, stop string, length.
    """

    def __init__(
        self, stop_sequences: list[str], eos_token_id: int | None, stop_token_ids: set[int], max_new_tokens: int
    ) -> None:
        if any(not isinstance(s, str) or s == "" for s in stop_sequences):
            raise ValueError("stop sequences must be non-empty strings")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.stop_sequences = list(dict.fromkeys(stop_sequences))
        self.eos_token_id = eos_token_id
        self.stop_token_ids = set(stop_token_ids)
        self.max_new_tokens = max_new_tokens
        self.generated = 0  # tokens fed so far
        self.held = ""  # text that may be the start of a stop string
        self.finish_reason: str | None = None
        self.matched_stop: str | None = None  # the stop string that ended the sequence
        self.matched_token: int | None = None  # the eos / stop token id that ended the sequence

    def is_stop_token(self, token_id: int) -> bool:
        """Whether this id ends the sequence by itself (eos or a stop token id)."""
        return token_id == self.eos_token_id or token_id in self.stop_token_ids

    @property
    def last_token(self) -> bool:
        """Whether the next token fed will reach max_new_tokens."""
        return self.generated + 1 >= self.max_new_tokens

    def feed(self, token_id: int, text: str) -> tuple[str, str | None]:
        """Record one generated token and its new text; return (text to emit now, finish reason or None)."""
        if self.finish_reason is not None:
            raise RuntimeError("feed() after the sequence finished")
        self.generated += 1
        if token_id == self.eos_token_id or token_id in self.stop_token_ids:
            self.matched_token = token_id
            return self._finish(self._release(), EOS_TOKEN)
        if not self.stop_sequences:  # nothing to hold back or find (the common case, once per token)
            return (text, None) if self.generated < self.max_new_tokens else self._finish(text, LENGTH)
        buf = self.held + text
        hit = self._find_stop(buf)
        if hit is not None:
            pos, s = hit
            self.held, self.matched_stop = "", s
            return self._finish(buf[:pos], STOP_SEQUENCE)
        if self.generated >= self.max_new_tokens:
            self.held = ""
            return self._finish(buf, LENGTH)
        keep = self._partial_suffix(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release held text at the end of the sequence (nothing after a matched stop string)."""
        return self._release()

    def _release(self) -> str:
        out, self.held = self.held, ""
        return out

    def _finish(self, out: str, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        return out, reason

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        """Earliest stop-string occurrence in buf (longest string on a tie)."""
        best: tuple[int, str] | None = None
        for s in self.stop_sequences:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_sequences:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


def advance(detok: Detokenizer, stop: StopChecker, token_id: int) -> tuple[str, str | None]:
    """Detokenize one generated token and run the stop checks: (text safe to emit, finish reason or None)."""
    _, emitted, reason = advance_token(detok, stop, token_id)
    return emitted, reason


def advance_token(detok: Detokenizer, stop: StopChecker, token_id: int) -> tuple[str, str, str | None]:
    """The per-token text step of a generation loop: (the token's own new text, text safe to emit, finish reason).

    Stop token ids are not detokenized (their own text is ""; an unfinished character held by the detokenizer
    before one is dropped: it could only print as U+FFFD); on the last token the detokenizer's held-back text is
    flushed through the stop checks, so nothing is lost at max_new_tokens.
    """
    # is_stop_token and last_token, inline: this runs once per generated token of every request
    if token_id == stop.eos_token_id or token_id in stop.stop_token_ids:
        emitted, reason = stop.feed(token_id, "")
        return "", emitted, reason
    text = detok.add(token_id)
    if stop.generated + 1 >= stop.max_new_tokens:
        text += detok.flush()
    emitted, reason = stop.feed(token_id, text)  # (not a starred tuple: that builds a list per token)
    return text, emitted, reason
