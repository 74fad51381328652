"""How many streamed tokens one HTTP frontend can deliver when the engine core is never what waits: a stand-in core
(a zmq ROUTER speaking server/protocol.py, no model) gives every running request a token each --step-ms, as a GPU
core whose step outruns the host would; real gam-serve frontends (uvicorn + the app, attached to it as
`--api-server-count` workers are) stream them to the load generator. This is issue #13's "mock model" for the
frontend: what a frontend costs per streamed token, and how many it can stream, with the step taken out.

    .venv/bin/python bench/frontend_capacity.py [base=/path/to/old/checkout] new=. [new2=.:frontends=2]
        [--streams 256] [--tokens 128] [--step-ms 1] [--seconds 8] [--reps 3]

Each SPEC is LABEL=CHECKOUT[:frontends=N]: that checkout's frontend code (PYTHONPATH=CHECKOUT, this venv), N worker
processes sharing one listening socket (default 1). The stand-in core is this file's (the protocol has not changed
between the checkouts compared); it replies to every submission at once, emits the tokens of a fixed WikiText-2
passage in order (ordinary text for the detokenizer; no eos, no stop token), and finishes a request at its
max_new_tokens with reason length, as the real core would. The load: `load_tests`' raw client, OpenAI streaming, N
closed-loop streams of --tokens tokens. Per run: tokens/s delivered, frontend CPU (all its processes, from /proc) per
streamed token, the stand-in core's CPU per token (it must not be the bottleneck), and the load generator's CPU per
token (this process). At a step far shorter than the frontend's per-step work the core runs ahead and the frontend is
saturated: its figures are its capacity. Runs alternate between the specs round by round; medians. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PROMPTS, bundled_model_dir, process_tree_cpu
from server import protocol as p

STAND_IN_FACTS = p.Facts("stand-in", "float32", "none", "cpu", 0, 4, 0, False, False, 0)


# -- the stand-in core ------------------------------------------------------------------------------------------
class StandInCore:
    """The engine core's side of the protocol with no model: every submission is admitted at once; every step_s,
    each running request gets the next token of `text_ids` (cycled), and the last at its max_new_tokens ends it with
    reason length. Cancels drop requests; metrics queries get an empty text. Serves any number of frontends."""

    def __init__(self, address: str, text_ids: list[int], step_s: float) -> None:
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.ROUTER)
        for opt in (zmq.SNDHWM, zmq.RCVHWM):  # as the real core: never drop a message
            self.sock.setsockopt(opt, 0)
        self.sock.bind(address)
        self.text_ids = np.asarray(text_ids, np.int64)
        self.step_s = step_s
        self.idents: dict[int, bytes] = {}  # frontend index -> its zmq identity
        self.running: dict[int, list[int]] = {}  # request id -> [tokens given, max_new_tokens]
        self.replies: list[p.Reply] = []
        self.steps = 0

    def run(self) -> None:
        """Serve until Shutdown (or the process is killed)."""
        due = time.monotonic()
        while True:
            # whole milliseconds, rounded up: zmq's poll truncates, and a 0 would spin the CPU the frontend needs
            wait_ms = math.ceil(max(0.0, (due - time.monotonic()) * 1e3)) if self.running else 1000
            if self.sock.poll(wait_ms):
                while True:
                    try:
                        ident, raw = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for msg in p.decode_to_core(raw):
                        if self.handle(ident, msg):
                            return
                if self.replies:  # the real core answers inputs at once, not at the next step
                    self.send(p.CoreOutput(replies=self.replies))
                    self.replies = []
            now = time.monotonic()
            if self.running and now >= due:
                self.send(self.step())
                due = max(due + self.step_s, now)  # a late step is not caught up in a burst
            elif not self.running:
                due = now

    def handle(self, ident: bytes, msg: p.ToCore) -> bool:
        """One message from a frontend; True on Shutdown."""
        if isinstance(msg, p.Hello):
            self.idents[msg.frontend] = ident
            self.sock.send_multipart([ident, p.encode(p.Ready(STAND_IN_FACTS))])
        elif isinstance(msg, p.Submit):
            for rid, r in zip(msg.ids, msg.requests, strict=True):
                self.running[rid] = [0, r.max_new_tokens]
            self.replies.append(p.Reply(msg.frontend, msg.token))
        elif isinstance(msg, p.Cancel):
            for rid in msg.ids:
                self.running.pop(rid, None)
        elif isinstance(msg, p.MetricsQuery):
            self.sock.send_multipart([ident, p.encode(p.MetricsText(msg.token, b""))])
        elif isinstance(msg, p.Drain):  # a frontend told to stop (the bench ends it): its requests are over
            self.running.clear()
            self.sock.send_multipart([ident, p.encode(p.Drained())])
        return isinstance(msg, p.Shutdown)

    def step(self) -> p.CoreOutput:
        """One step's output: a token for every running request; those at their length finish."""
        ids = np.fromiter(self.running, np.int64, len(self.running))
        tokens = self.text_ids[np.arange(self.steps, self.steps + len(ids)) % len(self.text_ids)]
        self.steps += 1
        finished = {}
        for row, rid in enumerate(ids.tolist()):
            state = self.running[rid]
            state[0] += 1
            if state[0] >= state[1]:
                finished[row] = p.Finish("length", state[0], None)
                del self.running[rid]
        return p.CoreOutput(
            ids=ids.tobytes(),
            tokens=tokens.tobytes(),
            logprobs=np.zeros(len(ids), np.float32).tobytes(),
            finished=finished,
            running=len(self.running),
            free_slots=max(0, 4096 - len(self.running)),
        )

    def send(self, out: p.CoreOutput) -> None:
        for f, part in out.split(sorted(self.idents)).items():
            self.sock.send_multipart([self.idents[f], p.encode(part)])


def text_ids(tokenizer_path: Path, eos: int | None) -> list[int]:
    """The token ids of the load generator's WikiText-2 passages (ordinary text), without eos."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(PROMPTS.read_text()[:20_000], add_special_tokens=False).ids
    return [i for i in ids if i != eos]


# -- a frontend worker (its own process, the checkout's code) ------------------------------------------------
FRONTEND = """
import socket, sys
from server.frontends import _worker
from server.settings import Settings
model, address, core_pid, index, fd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
settings = Settings(model=model, max_batch_size=4096, max_queue=4096, request_timeout=3600, log_level="warning")
_worker(settings, index, address, core_pid, socket.socket(fileno=fd))
"""


class Frontends:
    """N frontend worker processes of one checkout sharing a listening socket on 127.0.0.1 (the kernel's port)."""

    def __init__(self, checkout: Path, model_dir: Path, address: str, core_pid: int, count: int) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), OMP_NUM_THREADS="1")
        fd = self.sock.fileno()
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", FRONTEND, str(model_dir), address, str(core_pid), str(i), str(fd)],
                cwd=checkout,
                env=env,
                pass_fds=[fd],
            )
            for i in range(count)
        ]
        deadline = time.monotonic() + 120
        while not self.healthy():
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in self.procs):
                self.close()
                raise RuntimeError(f"the frontends of {checkout} did not become healthy")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cpu_seconds(self, system: bool = False) -> float:
        """CPU seconds of the frontend processes so far (system: the kernel's part only)."""
        return sum(sum(s for _, s in process_tree_cpu(pr.pid, system).values()) for pr in self.procs)

    def close(self) -> None:
        for pr in self.procs:
            pr.terminate()
        for pr in self.procs:
            try:
                pr.wait(15)
            except subprocess.TimeoutExpired:
                pr.kill()
        self.sock.close()


def cpu_now(core_pid: int, fronts: Frontends) -> dict[str, float]:
    """CPU seconds so far: the frontends (all, and the kernel's part), the stand-in core, this process (the load
    generator)."""
    c = psutil.Process(core_pid).cpu_times()
    return {
        "frontend": fronts.cpu_seconds(),
        "frontend_kernel": fronts.cpu_seconds(system=True),
        "core": c.user + c.system,
        "client": time.process_time(),
    }


def line(m: dict[str, float]) -> str:
    return (
        f"frontend {m['frontend']:5.1f} us/token (kernel {m['frontend_kernel']:4.1f}; {m['front_core_pct']:3.0f}% of "
        f"a core), {m['tok_s']:7.0f} tokens/s; /health p50 {m['health_p50_ms']:5.1f} ms, max "
        f"{m['health_max_ms']:6.1f} ms; stand-in core {m['core']:4.1f} us/token, load generator {m['client']:4.1f}"
    )


class HealthProbe:
    """GET /health every 100 ms from a thread of its own while the load runs: how long the frontend's event loop
    leaves a readiness probe waiting when it is saturated (deploy/k8s gives it 3 s)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.wait(0.1):
                t = time.perf_counter()
                client.get(self.url + "/health")
                self.times.append((time.perf_counter() - t) * 1e3)

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def quantile(self, q: float) -> float:
        """The q-quantile of the probe's latencies in ms (nearest rank; nan when none was made)."""
        t = sorted(self.times)
        return t[min(len(t) - 1, int(q * len(t)))] if t else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="*", default=["new=."], help="LABEL=CHECKOUT[:frontends=N]")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=1.0, help="the stand-in core's step period")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the runs and their medians here (bench/host.py reads it)")
    ap.add_argument("--core", nargs=3, metavar=("ADDRESS", "IDS_FILE", "STEP_MS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.core:  # the stand-in core process
        address, ids_file, step_ms = args.core
        ids = [int(x) for x in Path(ids_file).read_text().split()]
        StandInCore(address, ids, float(step_ms) / 1e3).run()
        return 0
    # the A/B parts, here and not at the top: the stand-in core process (above) needs neither torch nor the client
    from bench.frontend_ab import parse_spec, stream_load
    from load_tests.runner import run

    bundled = bundled_model_dir()
    if bundled is None:
        raise SystemExit("needs the bundled model's tokenizer (weights/*/tokenizer.json)")
    eos = json.loads((bundled / "config.json").read_text()).get("eos_token_id")
    labels = [parse_spec(s)[0] for s in args.specs]
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ids_file = Path(tmp) / "ids.txt"
        ids_file.write_text(" ".join(map(str, text_ids(bundled / "tokenizer.json", eos))))
        sides = []
        for n, spec in enumerate(args.specs):
            _, checkout, extra = parse_spec(spec)
            address = f"ipc://{tmp}/core{n}"
            core = subprocess.Popen([sys.executable, __file__, "--core", address, str(ids_file), str(args.step_ms)])
            stack.callback(core.kill)
            fronts = Frontends(checkout, bundled, address, core.pid, int(extra.get("frontends", 1)))
            stack.callback(fronts.close)
            sides.append((core, fronts))

        for _, fronts in sides:
            run(stream_load(fronts.url, args.streams, args.tokens, 2.0))  # warm
        for rep in range(args.reps):
            for label, (core, fronts) in zip(labels, sides, strict=True):
                with HealthProbe(fronts.url) as probe:
                    before, t0 = cpu_now(core.pid, fronts), time.monotonic()
                    res = run(stream_load(fronts.url, args.streams, args.tokens, args.seconds))
                    after, wall = cpu_now(core.pid, fronts), time.monotonic() - t0
                tokens = sum(len(r.token_times) for r in res.records)
                used = {k: after[k] - before[k] for k in after}
                m = {k: v / tokens * 1e6 for k, v in used.items()} | {
                    "tok_s": tokens / wall,
                    "front_core_pct": used["frontend"] / wall * 100,
                    "health_p50_ms": probe.quantile(0.5),
                    "health_max_ms": probe.quantile(1.0),
                }
                rows[label].append(m)
                print(f"{label:>10} rep {rep}: {line(m)}", flush=True)
    print(f"\nmedians of {args.reps}, {args.streams} streams x {args.tokens} tokens, stand-in step {args.step_ms} ms:")
    first = statistics.median(r["frontend"] for r in rows[labels[0]])
    medians = {}
    for label, runs in rows.items():
        med = medians[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{label:>10}: {line(med)} ({med['frontend'] / first:.2f}x {labels[0]}'s frontend CPU)")
    if args.json is not None:
        settings = {"specs": args.specs, "streams": args.streams, "tokens": args.tokens, "step_ms": args.step_ms,
                    "seconds": args.seconds, "reps": args.reps}  # fmt: skip
        # per label: frontend / frontend_kernel / core / client = CPU us per streamed token, and tok_s, ...
        args.json.write_text(json.dumps({"settings": settings, "medians": medians, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
