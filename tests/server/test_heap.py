"""A finished request's objects are freed by reference counting, not left for the garbage collector: a busy frontend
that left a few dozen objects per request in reference cycles paid for young-generation collections of tens of
milliseconds each (every stream stalled meanwhile), and more of them (server/heap.py)."""

from __future__ import annotations

import gc
import json
import socket
import time

from tests.server.conftest import MODEL_ID, NO_EOS, LiveServer


def post(port: int, path: str, body: dict, *, leave_after: int | None = None) -> bytes:
    """A raw HTTP/1.1 POST (no client library, whose own objects would count); `leave_after` bytes: the client
    closes the connection once it has that much of the answer (a stream it walks away from)."""
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode() + b"Connection: close\r\n\r\n" + data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
            if leave_after is not None and len(got) >= leave_after:
                break
    return got


def settled(srv: LiveServer) -> None:
    """Wait (bounded) until the server has no request task left: every answer's handling, its cleanup included, is
    over, so whatever it left in reference cycles is unreachable now."""
    deadline = time.monotonic() + 30
    while srv.server.server_state.tasks or not srv.engine.idle:
        assert time.monotonic() < deadline, "the server did not finish its requests"
        time.sleep(0.01)


def test_requests_leave_no_reference_cycles(make_settings) -> None:
    with LiveServer(make_settings()) as srv:
        stream = {"model": MODEL_ID, "prompt": "The game", "max_tokens": 6, "stream": True, "temperature": 0}
        calls = [
            ("/v1/completions", stream),
            ("/v1/completions", {**stream, "stream": False, "logprobs": 2, "n": 2}),
            ("/generate_stream", {"inputs": "The game", "parameters": {"max_new_tokens": 6}}),
            ("/generate", {"inputs": "The game", "parameters": {"max_new_tokens": 6, "details": True}}),
            ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),  # an error answer
        ]
        for path, body in calls:  # warm: first-use caches, lazily built objects
            post(srv.port, path, body)
        settled(srv)
        rounds = 10
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                for path, body in calls:
                    post(srv.port, path, body)
            settled(srv)
            found = gc.collect()
        finally:
            gc.enable()
        # before: 83 objects per streamed completion, 29 per other request (a stream and its handles pointed at
        # each other; the server's send in the request's scope pointed back at the scope); now none
        assert found < rounds, f"{found} objects in reference cycles after {rounds * len(calls)} requests"


def test_a_stream_the_client_leaves_leaves_no_reference_cycles(make_settings) -> None:
    with LiveServer(make_settings()) as srv:
        body = {"model": MODEL_ID, "prompt": "The game", "max_tokens": 40, "stream": True, "logit_bias": NO_EOS}
        post(srv.port, "/v1/completions", body, leave_after=400)
        settled(srv)
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                post(srv.port, "/v1/completions", body, leave_after=400)
            settled(srv)  # it noticed each departure and dropped each request
            found = gc.collect()
        finally:
            gc.enable()
        assert found < 10, f"{found} objects in reference cycles after 10 streams left early"
