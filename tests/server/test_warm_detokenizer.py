"""The detokenizer's per-id table is built at startup, off the event loop, not at the first request's first token."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from gam_model.tokenizer import Tokenizer
from server import app as server_app
from tests.gam_model.tokenizers_for_tests import byte_bpe
from tests.server.conftest import tiny_settings


async def test_byte_pieces_are_built_at_startup_in_a_worker(tmp_path, monkeypatch) -> None:
    tok = Tokenizer(byte_bpe().tok)  # a fresh one: nothing built yet
    threads: list[str] = []
    real = Tokenizer.byte_pieces

    def observed(self, skip_special_tokens: bool = False):
        threads.append(threading.current_thread().name)
        return real(self, skip_special_tokens)

    class FakeEngine:
        def __init__(self, settings, tokenizer, frontend: int = 0) -> None:
            self.tokenizer = tokenizer

        async def start(self):
            return SimpleNamespace(model_id="m", num_params=1, dtype="float32", device="cpu")

    monkeypatch.setattr(Tokenizer, "byte_pieces", observed)
    monkeypatch.setattr(server_app, "read_config", lambda model_dir: (None, None))
    monkeypatch.setattr(server_app, "load_tokenizer", lambda model_dir, config, meta: tok)
    monkeypatch.setattr(server_app, "Engine", FakeEngine)
    ctx = await server_app.start_context(tiny_settings(tmp_path))  # no checkpoint read: the fakes above
    assert ctx.tokenizer is tok
    assert threads and threading.main_thread().name not in threads
    assert False in tok._pieces and tok._pieces[False] is not None  # built: the first token only looks it up
