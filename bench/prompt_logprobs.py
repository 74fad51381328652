"""Prompt logprobs over HTTP: how long an N-token `echo` + `logprobs` request takes, and what it does to a stream
decoding beside it (its inter-token gaps alone vs during the scoring). Scoring is O(prompt), so the engine does it
in ~30 ms slices between decode steps (--score-budget-s, server/core.py ScoreBudget).

gam-serve runs in a subprocess on 127.0.0.1. Per repeat: a stream of --stream-tokens alone, then the same stream
with the echo request sent 0.3 s after it starts. The prompt is the load generator's WikiText-2 prompt file cut to
N tokens of the served tokenizer, sent as token ids (as lm-evaluation-harness does). Medians over repeats.

    .venv/bin/python bench/prompt_logprobs.py [--model DIR] [--tokens 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ServerProcess, machine, prompt_corpus, served_model
from gam_model.tokenizer import Tokenizer


async def stream_gaps(client: httpx.AsyncClient, url: str, n: int) -> list[tuple[float, float]]:
    """(arrival time, seconds since the previous token) for each token after the first of one TGI stream."""
    body = {"inputs": "The history of the city", "parameters": {"max_new_tokens": n}}
    gaps, last = [], None
    async with client.stream("POST", f"{url}/generate_stream", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now, now - last))
                last = now
    return gaps


async def one_round(url: str, model: str, ids: list[int], stream_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        alone = await stream_gaps(client, url, stream_tokens)
        beside = asyncio.create_task(stream_gaps(client, url, stream_tokens))
        await asyncio.sleep(0.3)
        body = {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/completions", json=body)
        t1 = time.perf_counter()
        r.raise_for_status()
        scored = r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
        beside_gaps = await beside
    during = [g for t, g in beside_gaps if t0 < t <= t1]  # tokens that arrived while the prompt was scored
    return {
        "echo_s": t1 - t0,
        "nll_per_token": -sum(scored) / len(scored),
        "gap_alone_ms_median": statistics.median(g for _, g in alone) * 1e3,
        "gap_during_ms_median": statistics.median(during) * 1e3,
        "gap_during_ms_max": max(during) * 1e3,
        "tokens_during": len(during),
        "stream_outlasted_scoring": beside_gaps[-1][0] > t1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: bundled weights/*, else random paper config)")
    p.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens")
    p.add_argument("--stream-tokens", type=int, default=1000, help="tokens the concurrent stream generates")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out", type=Path, default=RESULTS / "prompt_logprobs.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = served_model(args.model, Path(tmp))
        tok = Tokenizer.from_file(model_dir / "tokenizer.json")
        ids = (tok.encode(prompt_corpus()) * (args.tokens // 1000 + 1))[: args.tokens]
        max_new = max(args.stream_tokens, 16)
        with ServerProcess(
            model_dir, threads=args.threads, max_input_tokens=args.tokens + 64, max_new_tokens=max_new
        ) as srv:
            model = srv.info().get("model_id") or "gam"
            rounds = []
            for i in range(args.repeats):
                rounds.append(asyncio.run(one_round(srv.url, model, ids, args.stream_tokens)))
                print(f"repeat {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1].items()), flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{args.tokens}-token prompt logprobs: {med['echo_s']:.2f} s; a concurrent stream's inter-token gap "
          f"{med['gap_alone_ms_median']:.1f} ms alone, {med['gap_during_ms_median']:.1f} ms during "
          f"(max {med['gap_during_ms_max']:.0f} ms)")  # fmt: skip
    doc = {"benchmark": "prompt logprobs (echo + logprobs) beside a decoding stream", "machine": machine(),
           "command": "python " + " ".join(sys.argv), "model": str(model_dir), "settings": vars(args) | {"model": str(model_dir), "out": str(args.out)},
           "repeats": rounds, "median": med}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
