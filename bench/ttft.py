"""Time to first token over HTTP vs prompt length (16 ... 8000 tokens): it should stay flat (prefill is O(R)).

gam-serve runs in a subprocess on 127.0.0.1; one streaming OpenAI completion at a time (max_tokens 2), prompt
lengths interleaved within each repeat round; medians. The prompt is a WikiText-2 excerpt cut to N tokens of the
served tokenizer; the server-reported prompt_tokens are recorded. Tokenizing the prompt is the only work that grows
with its length, so the script also times the tokenizer on each prompt in-process, for comparison. The server
process's CPU time per request (from /proc) is recorded too: on a shared machine it is steadier than wall time.

    .venv/bin/python bench/ttft.py
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
from load_tests import protocols
from load_tests.client import stream_request
from load_tests.metrics import RequestRecord


def prompt_of(tok: Tokenizer, ids: list[int], n: int) -> str:
    """Text of about n tokens: the first n ids of the corpus (repeated if short), decoded."""
    reps = -(-n // len(ids))
    return tok.decode((ids * reps)[:n])


async def measure(
    srv: ServerProcess, model: str, prompts: dict[int, str], repeats: int
) -> tuple[dict[int, list[RequestRecord]], dict[int, float]]:
    """Records per prompt length (warm-up round dropped) and the server's mean CPU seconds per request."""
    out: dict[int, list[RequestRecord]] = {n: [] for n in prompts}
    cpu = dict.fromkeys(prompts, 0.0)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        for round_ in range(repeats + 1):  # the first round warms up and is dropped
            for n, text in prompts.items():
                rec = RequestRecord(start=time.perf_counter())
                body = protocols.body("openai", text, 2, model=model)
                c0 = srv.cpu_seconds()
                await stream_request(client, "openai", protocols.APIS["openai"], body, rec)
                if round_:
                    cpu[n] += (srv.cpu_seconds() - c0) / repeats
                if rec.error:
                    raise RuntimeError(f"prompt of {n} tokens failed: {rec.error}")
                out[n].append(rec)
    return {n: recs[1:] for n, recs in out.items()}, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: bundled weights/*, else random paper config)")
    p.add_argument("--lengths", default="16,64,256,1024,4000,8000", help="prompt lengths in tokens")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out", type=Path, default=RESULTS / "ttft.json")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, source = served_model(args.model, Path(tmp))
        tok = Tokenizer.from_file(model_dir / "tokenizer.json")
        ids = tok.encode(prompt_corpus())
        prompts = {n: prompt_of(tok, ids, n) for n in lengths}
        tokenize_ms = {}
        for n, text in prompts.items():
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                tok.encode(text)
                ts.append((time.perf_counter() - t) * 1000)
            tokenize_ms[n] = statistics.median(ts)
        with ServerProcess(model_dir, threads=args.threads, max_input_tokens=max(lengths) + 64) as srv:
            info = srv.info()
            model = info.get("model_id") or "gam"
            recs, server_cpu = asyncio.run(measure(srv, model, prompts, args.repeats))
    rows = []
    for n in lengths:
        ttft = [r.ttft * 1000 for r in recs[n]]
        rows.append({"prompt_tokens_requested": n, "prompt_tokens_served": recs[n][0].prompt_tokens,
                     "ttft_ms_median": statistics.median(ttft), "ttft_ms": ttft,
                     "tokenize_ms_median": tokenize_ms[n], "server_cpu_ms_per_request": server_cpu[n] * 1000})  # fmt: skip
        print(f"{n:>6} tokens (server counted {rows[-1]['prompt_tokens_served']}): TTFT median "
              f"{rows[-1]['ttft_ms_median']:.1f} ms; server CPU per request {server_cpu[n] * 1000:.1f} ms; "
              f"tokenizing it in-process {tokenize_ms[n]:.2f} ms", flush=True)  # fmt: skip
    ratio = rows[-1]["ttft_ms_median"] / rows[0]["ttft_ms_median"]
    first_cpu = rows[0]["server_cpu_ms_per_request"]  # /proc counts 10 ms ticks: 0 when below resolution
    cpu_ratio = rows[-1]["server_cpu_ms_per_request"] / first_cpu if first_cpu > 0 else None
    doc = {"benchmark": "TTFT over HTTP vs prompt length (one request at a time, OpenAI streaming, max_tokens 2)",
           "command": "python bench/ttft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "model": {"dir": str(model_dir), "source": source}, "server_info": info,
           "rows": rows, "ttft_ratio_longest_vs_shortest": ratio,
           "server_cpu_ratio_longest_vs_shortest": cpu_ratio}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.out.with_suffix(".png"))
    cpu_text = f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "below /proc resolution at the shortest"
    print(
        f"TTFT({lengths[-1]}) / TTFT({lengths[0]}) = {ratio:.2f}; server CPU per request: {cpu_text}; wrote {args.out}"
    )
    return 0


def plot(doc: dict, path: Path) -> None:
    """TTFT (median and every repeat) and tokenizer time vs prompt length, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    x = [r["prompt_tokens_requested"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter([r["prompt_tokens_requested"]] * len(r["ttft_ms"]), r["ttft_ms"], s=8, color="C0", alpha=0.4)
    ax.plot(x, [r["ttft_ms_median"] for r in rows], "o-", color="C0", label="TTFT over HTTP (median)")
    ax.plot(x, [r["server_cpu_ms_per_request"] for r in rows], "^-", color="C2", label="server CPU per request (mean)")
    ax.plot(x, [r["tokenize_ms_median"] for r in rows], "s--", color="C1", label="tokenizing the prompt (in-process)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms")
    model = f"{doc['server_info'].get('model_id')}, {doc['model']['source']}"
    ax.set_title(f"TTFT vs prompt length ({model}; {doc['machine']['cpu']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
