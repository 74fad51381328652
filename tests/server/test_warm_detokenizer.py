"""The detokenizer's per-id table is built at startup, off the event loop, not at the first request's first token."""

from __future__ import annotations

import threading

from gam_model.detokenize import ByteDetokenizer, incremental_detokenizer
from gam_model.tokenizer import Tokenizer
from tests.server.conftest import app_client


async def test_byte_pieces_are_built_at_startup_in_a_worker(make_settings, monkeypatch) -> None:
    threads: list[threading.Thread] = []
    real = Tokenizer.byte_pieces

    def observed(self: Tokenizer, skip_special_tokens: bool = False):  # the real method, its thread noted
        threads.append(threading.current_thread())
        return real(self, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "byte_pieces", observed)
    async with app_client(make_settings()) as (app, _):  # the real app and engine core on the tiny checkpoint
        tok = app.state.ctx.tokenizer
        assert threads and threading.main_thread() not in threads  # built before any request, in a worker
        built = len(threads)
        assert isinstance(incremental_detokenizer(tok), ByteDetokenizer)  # the checkpoint's byte-level BPE
        assert len(threads) == built + 1  # a request's detokenizer only looks the table up
        assert tok.byte_pieces() is real(tok)  # the same table object: built once
