"""Build a bundled model directory weights/NAME/ from a gam-train run: weights, evaluation, samples, model card.

Usage (from the repository root):
    .venv/bin/python weights/bundle.py --run runs/gam-wikitext2 --name gam-wikitext2 --dtype bf16 \
        --train ../shared/data/wikitext-2/train.txt --valid ../shared/data/wikitext-2/valid.txt \
        --test ../shared/data/wikitext-2/test.txt --command runs/gam-wikitext2.cmd [--paper-md runs/paper.md]

The stored weights are what gets evaluated: they are saved first, loaded back (upcast to fp32) and scored with
gam-eval's exact sliding-window scoring; the results land in eval.json and in the card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gam_model.checkpoint import load_checkpoint, read_config, save_checkpoint
from gam_model.data import encode_stream, read_text
from gam_model.decode import Decoder
from gam_model.evaluate import evaluate_text
from gam_model.generate import generate
from gam_model.sampling import SamplingParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPTS = [
    "The history of the city",
    "In 1998 , the band released",
    "The species is found in",
    "During the Second World War ,",
]


def export(run: Path, out: Path, name: str, dtype: str) -> None:
    """Copy the run's checkpoint into `out` with weights stored in `dtype`, plus its training curve."""
    model, tok, _ = load_checkpoint(run)
    _, meta = read_config(run)
    meta.model_name = name
    save_checkpoint(out, model.to(DTYPES[dtype]), tok, meta)
    shutil.copy(run / "curve.png", out / "curve.png")


def samples(out: Path, max_new_tokens: int) -> list[dict]:
    """Greedy and seeded sampled continuations of PROMPTS from the stored weights (fp32 compute)."""
    model, tok, _ = load_checkpoint(out)
    dec = Decoder(model, num_slots=len(PROMPTS), device="cpu", dtype=torch.float32)
    modes = {
        "greedy": SamplingParams(do_sample=False),
        "sampled (temperature 0.8, top_p 0.95, seed 0)": SamplingParams(temperature=0.8, top_p=0.95, seed=0),
    }
    rows = []
    for mode, params in modes.items():
        for prompt, r in zip(PROMPTS, generate(dec, tok, PROMPTS, params, max_new_tokens), strict=True):
            rows.append({"mode": mode, "prompt": prompt, "completion": r.text})
    return rows


def card(out: Path, name: str, dtype: str, ev: dict, gens: list[dict], paper: dict | None, cmd: str, tr: dict) -> str:
    """The model card (README.md)."""
    cfg = json.loads((out / "config.json").read_text())
    model, _, _ = load_checkpoint(out)
    n_params = model.num_params()
    lines = [
        f"# {name}",
        "",
        "A small GAM (Gated Associative Memory, arXiv 2509.00605) language model trained with this project's",
        "`gam-train` on WikiText-2; the default model that `gam-serve` loads. A demonstration model, not a",
        "useful assistant: it writes Wikipedia-flavoured English of WikiText-2's tokenized style (` @-@ `, ` , `).",
        "",
        "## Model",
        "",
        f"- Parameters: {n_params:,} (head tied to the token embedding); weights stored in **{dtype}**"
        f" (`model.safetensors`, {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB), trained in fp32"
        " with bf16 autocast.",
        f"- Config: width {cfg['n_embd']}, {cfg['n_layer']} layers, {cfg['n_slots']} memory slots, conv kernel"
        f" {cfg['conv_kernel']}, block_size {cfg['block_size']} (receptive field"
        f" {cfg['n_layer'] * (cfg['conv_kernel'] - 1) + 1} tokens), dropout {cfg['dropout']} (training only).",
        f"- Tokenizer: byte-level BPE, {cfg['vocab_size']} tokens, trained on the training split; `<|endoftext|>`"
        " (id 0) is bos and eos. Decoding restores the text's spacing exactly.",
        "",
        "## Data and license",
        "",
        'WikiText-2 (Stephen Merity, Caiming Xiong, James Bradbury, Richard Socher, "Pointer Sentinel Mixture',
        'Models", 2016, https://arxiv.org/abs/1609.07843), licensed Creative Commons Attribution-ShareAlike 3.0',
        "(and GFDL), as is text derived from it; this model is trained on it and its samples echo it.",
        "Trained on the tokenized train split (`wikitext-2-v1` `train.txt`, with `<unk>`; the raw train split was",
        "not available), validated on `valid.txt` and tested on `test.txt` of the same variant.",
        "",
        "## Training",
        "",
        f"{tr.get('step', '?')} steps of AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then",
        "cosine decay to 10% of the peak learning rate, gradient clipping 1.0, bf16 autocast on CPU, random",
        f"windows of block_size tokens; {tr.get('tokens_seen', 0):,} training tokens seen"
        f" (~{tr.get('epochs', 0):.2f} epochs of the {tr.get('train_tokens', 0):,}-token training stream), on a",
        "shared 2-core CPU. The schedule length was fitted to a wall-clock budget (`--time-budget-min`: the step",
        "count is fixed from the measured step time after 30 steps and only shortened if the run falls behind),",
        f"so a rerun on another machine sees a different number of steps (this one: {tr.get('max_steps')}).",
        "",
        "Reproduce (from the repository root; the data path is this machine's):",
        "",
        "```sh",
        cmd,
        "```",
        "",
        "![training curve](curve.png)",
        "",
        "## Evaluation",
        "",
        "Exact for the served semantics (`gam-eval`, DESIGN 1.3): every token is scored with the forward over the",
        "last min(N, block_size) tokens of the file read as one stream (opened by `<|endoftext|>`). Perplexity is",
        "per BPE token of this tokenizer, so only bits per byte (total NLL / ln 2 / UTF-8 bytes) compares across",
        "tokenizers. Scored from the stored weights upcast to fp32.",
        "",
        "| split | tokens | bytes | loss (nats/token) | perplexity | bits per byte |",
        "|---|---|---|---|---|---|",
    ]
    for split, r in ev.items():
        lines.append(
            f"| {split} | {r['tokens']:,} | {r['bytes']:,} | {r['loss']:.4f} | {r['perplexity']:.2f} |"
            f" {r['bits_per_byte']:.4f} |"
        )
    if paper:
        lines += ["", "### Beside the paper's setting", "", paper["text"]]
    lines += ["", "## Samples", "", "Generated with `gam_model.generate` from the stored weights (fp32 compute).", ""]
    for g in gens:
        completion = g["completion"].replace("\n", " ⏎ ")
        lines.append(f"- *{g['mode']}* — **{g['prompt']}**{completion}")
    lines += ["", "Files: `config.json`, `model.safetensors`, `tokenizer.json`, `curve.png`, `eval.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--valid", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--train", required=True, help="the training text (to count its tokens for the epochs figure)")
    p.add_argument("--command", type=Path, default=None, help="file holding the exact training command, for the card")
    p.add_argument("--paper-md", type=Path, default=None, help="markdown paragraph comparing with the paper's setting")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-eval", action="store_true", help="reuse eval.json already in the directory")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(__file__).resolve().parent / args.name
    if not args.skip_eval:
        export(args.run, out, args.name, args.dtype)
        model, tok, _ = load_checkpoint(out)
        ev = {}
        for split, path in (("validation", args.valid), ("test", args.test)):
            t0 = time.monotonic()
            r = evaluate_text(model, tok, read_text(path), progress=True)
            ev[split] = r.to_dict()
            print(f"{split}: ppl {r.perplexity:.2f}  bpb {r.bits_per_byte:.4f}  ({time.monotonic() - t0:.0f}s)")
        (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    ev = json.loads((out / "eval.json").read_text())
    gens = samples(out, args.max_new_tokens)
    tr = dict(json.loads((out / "config.json").read_text()).get("training", {}))
    _, tok, _ = load_checkpoint(out)
    tr["train_tokens"] = len(encode_stream(tok, read_text(args.train)))
    tr["epochs"] = tr.get("tokens_seen", 0) / tr["train_tokens"]
    cmd = args.command.read_text().strip() if args.command else "(see the run log)"
    paper = {"text": args.paper_md.read_text().strip()} if args.paper_md else None
    (out / "README.md").write_text(card(out, args.name, args.dtype, ev, gens, paper, cmd, tr) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
