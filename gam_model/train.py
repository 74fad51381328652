"""Training loop for GAM language models (nanoGPT style): AdamW, warm-up + cosine, clipping, bf16 autocast.

The run directory holds the serving checkpoint (DESIGN 1.4: config.json, model.safetensors, tokenizer.json),
`train_state.pt` (everything needed to resume exactly: model, optimizer, step, schedule, RNG states),
`log.jsonl` (train and validation losses) and `curve.png`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.config import GAMConfig
from gam_model.data import encode_stream, read_text, special_tokens, train_tokenizer
from gam_model.model import GAM
from gam_model.tokenizer import Tokenizer

STATE = "train_state.pt"
LOG = "log.jsonl"
CURVE = "curve.png"


@dataclass
class TrainConfig:
    """Everything a run needs; saved beside the checkpoint so a resume uses the same settings."""

    train_file: str
    out_dir: str
    val_file: str | None = None
    model_name: str = "gam"
    tokenizer: str = "bytelevel"  # data.RECIPES
    vocab_size: int = 8192
    block_size: int = 1024
    n_embd: int = 256
    n_layer: int = 4
    n_slots: int = 256
    conv_kernel: int = 3
    dropout: float = 0.1
    batch_size: int = 8
    seq_len: int | None = None  # training window; default block_size (every position row gets trained)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int | None = None  # fixed schedule length; or derived from time_budget_min
    time_budget_min: float | None = None
    calib_steps: int = 20  # steps timed before the schedule length is fixed from the time budget
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype: bf16 or fp32
    device: str = "cpu"
    threads: int | None = None
    seed: int = 1337
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval_min: float = 5.0
    log_interval: int = 10
    extra: dict = field(default_factory=dict)

    @property
    def window(self) -> int:
        return self.seq_len or self.block_size

    def model_config(self, vocab_size: int) -> GAMConfig:
        return GAMConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_slots=self.n_slots,
            conv_kernel=self.conv_kernel,
            dropout=self.dropout,
        )


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None) -> float:
    """Linear warm-up to cfg.lr, then cosine down to lr*min_lr_ratio at max_steps (held at peak until known)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if max_steps is None:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: GAM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (weights, embeddings, memory banks), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def get_batch(data: torch.Tensor, batch: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of T tokens and their next-token targets: (B, T) each."""
    starts = torch.randint(0, len(data) - T - 1, (batch,), generator=gen)  # (B,)
    offs = torch.arange(T + 1)  # (T+1,)
    win = data[starts.unsqueeze(1) + offs]  # (B, T+1)
    return win[:, :-1], win[:, 1:]


def val_windows(data: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """n windows of T+1 tokens spread evenly over the validation stream (fixed, so losses are comparable)."""
    n = max(1, min(n, (len(data) - 1) // T))
    starts = torch.linspace(0, len(data) - T - 1, n).long()  # (n,)
    return data[starts.unsqueeze(1) + torch.arange(T + 1)]  # (n, T+1)


def autocast(cfg: TrainConfig):
    """bf16 autocast on CPU or CUDA, or a no-op for fp32."""
    if cfg.dtype == "fp32":
        return torch.autocast(device_type=torch.device(cfg.device).type, enabled=False)
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)


def loss_of(model: GAM, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of a batch."""
    with autocast(cfg):
        logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate_windows(model: GAM, windows: torch.Tensor, cfg: TrainConfig, batch: int) -> float:
    """Mean loss over fixed validation windows (positions 0..T-1: the in-block regime)."""
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(cfg.device)
        tot += loss_of(model, w[:, :-1], w[:, 1:], cfg).item() * w.numel()
        n += w.numel()
    model.train()
    return tot / n


def atomic_torch_save(obj: dict, path: Path) -> None:
    """torch.save via a temporary file and rename, so an interruption never leaves half a state."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_curve(out: Path, title: str) -> None:
    """Draw train (smoothed) and validation loss against step into curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
    rows = list({(r["kind"], r["step"]): r for r in rows}.values())  # a resumed run redoes a few logged steps
    rows.sort(key=lambda r: r["step"])
    tr = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    va = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if tr:
        s, loss = zip(*tr, strict=True)
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(s, loss, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(s[k - 1 :], smooth, color="tab:blue", label="train (smoothed)")
    if va:
        s, loss = zip(*va, strict=True)
        ax.plot(s, loss, "o-", color="tab:orange", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / (CURVE + ".tmp.png"))
    plt.close(fig)
    os.replace(out / (CURVE + ".tmp.png"), out / CURVE)


class Trainer:
    """One training run in `cfg.out_dir`, fresh or resumed from its train_state.pt."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        state_path = self.out / STATE
        if state_path.exists() and not resume:
            raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or use another --out")
        if resume and not state_path.exists():
            raise FileNotFoundError(f"--resume: no {state_path}")
        if resume:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            saved = dict(state["train_config"])
            max_steps_override = cfg.max_steps  # an explicit --max-steps re-fits the schedule of a resumed run
            budget = cfg.time_budget_min if cfg.time_budget_min is not None else saved["time_budget_min"]
            self.cfg = cfg = TrainConfig(
                **{**saved, "out_dir": cfg.out_dir, "threads": cfg.threads, "time_budget_min": budget}
            )
            self.tok = Tokenizer.from_file(self.out / "tokenizer.json", state["eos_token_id"], state["bos_token_id"])
        else:
            torch.manual_seed(cfg.seed)
            self.tok = train_tokenizer([cfg.train_file], cfg.tokenizer, cfg.vocab_size)
            self.tok.save(self.out / "tokenizer.json")
            (self.out / LOG).write_text("")
        self.train_data = torch.from_numpy(encode_stream(self.tok, read_text(cfg.train_file)))
        self.val_data = torch.from_numpy(encode_stream(self.tok, read_text(cfg.val_file))) if cfg.val_file else None
        self.model = GAM(cfg.model_config(self.tok.vocab_size)).to(cfg.device)
        self.opt = make_optimizer(self.model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.max_steps = cfg.max_steps
        self.elapsed = 0.0  # training wall time over all sessions, seconds
        self.tokens_seen = 0
        if resume:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.step, self.max_steps = state["step"], state["max_steps"]
            if max_steps_override is not None and max_steps_override != self.max_steps:
                print(f"resume: schedule length {self.max_steps} -> {max_steps_override} steps (--max-steps)")
                self.max_steps = self.cfg.max_steps = max_steps_override
            self.elapsed, self.tokens_seen = state["elapsed"], state["tokens_seen"]
            self.truncate_log()

    def truncate_log(self) -> None:
        """Drop log rows written after the saved step (they are about to be redone)."""
        path = self.out / LOG
        if path.exists():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= self.step]
            path.write_text("".join(r + "\n" for r in rows))

    def save(self) -> None:
        """Write the serving checkpoint, then the resume state (atomically), then the curve."""
        cfg = self.cfg
        meta = CheckpointMeta(
            model_name=cfg.model_name,
            eos_token_id=self.tok.eos_token_id,
            bos_token_id=self.tok.bos_token_id,
            special_tokens=special_tokens(self.tok),
            extra={
                "training": {
                    "step": self.step,
                    "max_steps": self.max_steps,
                    "tokens_seen": self.tokens_seen,
                    "tokenizer_recipe": cfg.tokenizer,
                }
            },
        )
        save_checkpoint(self.out, self.model, self.tok, meta)
        state = {
            "train_config": asdict(cfg),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "data_rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "max_steps": self.max_steps,
            "elapsed": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "eos_token_id": self.tok.eos_token_id,
            "bos_token_id": self.tok.bos_token_id,
        }
        atomic_torch_save(state, self.out / STATE)
        try:
            plot_curve(self.out, f"{cfg.model_name}: {self.model.num_params() / 1e6:.2f}M params")
        except Exception as e:  # the plot is a convenience; never lose a run over it
            print(f"curve plot failed: {e}")

    def log(self, **row) -> None:
        with (self.out / LOG).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def plan(self, sec_per_step: float) -> None:
        """Fit the schedule into the time budget from the measured seconds per step (evals and saves included).

        Fixed once after calibration; later shortened when the run falls behind (the CPU is shared), or lengthened
        while still in the first 60% of the schedule when it runs >10% ahead. The budget's hard stop still holds.
        """
        assert self.cfg.time_budget_min is not None  # plan() runs only under a time budget
        budget = self.cfg.time_budget_min * 60.0
        fit = self.step + int(max(0.0, budget - self.elapsed) / sec_per_step)
        # 8% margin for noise, never fewer steps than already made (calibration can spend the budget on a stalled CPU)
        target = max(self.cfg.warmup_steps + 1, self.step, int(fit * 0.92))
        if self.max_steps is None:
            self.max_steps = target
            print(f"schedule: {self.max_steps} steps ({sec_per_step:.2f}s/step, budget {budget / 60:.0f} min)")
        elif fit < self.max_steps:
            self.max_steps = max(self.step + 1, fit)
            print(f"running late: schedule shortened to {self.max_steps} steps ({sec_per_step:.2f}s/step)")
        elif target > 1.1 * self.max_steps and self.step < 0.6 * self.max_steps:
            self.max_steps = target
            print(f"running ahead: schedule lengthened to {self.max_steps} steps ({sec_per_step:.2f}s/step)")

    def run(self, stop_after: int | None = None) -> list[float]:
        """Train until max_steps (or the time budget, or `stop_after` steps); returns the step losses."""
        cfg, model = self.cfg, self.model
        if self.max_steps is None and cfg.time_budget_min is None:
            raise ValueError("give max_steps or time_budget_min")
        T, B = cfg.window, cfg.batch_size
        vwin = val_windows(self.val_data, cfg.eval_batches * B, T) if self.val_data is not None else None
        print(
            f"model {model.num_params() / 1e6:.2f}M params, vocab {self.tok.vocab_size}, "
            f"train {len(self.train_data)} tokens, window {T}, batch {B}"
        )
        model.train()
        losses: list[float] = []
        last_save = time.monotonic()
        interval_t0, interval_s0 = time.monotonic(), self.step
        calib_t0 = None
        session = 0  # steps in this session (calibration timing restarts after a resume)
        bar = tqdm(total=self.max_steps, initial=self.step, desc=cfg.model_name, mininterval=5, dynamic_ncols=True)
        while self.max_steps is None or self.step < self.max_steps:
            t0 = time.monotonic()
            lr = lr_at(self.step, cfg, self.max_steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x, y = get_batch(self.train_data, B, T, self.gen)
            loss = loss_of(model, x.to(cfg.device), y.to(cfg.device), cfg)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.step += 1
            session += 1
            self.tokens_seen += B * T
            lv = loss.item()
            losses.append(lv)
            self.elapsed += time.monotonic() - t0
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == 1:
                self.log(
                    kind="train",
                    step=self.step,
                    loss=lv,
                    lr=lr,
                    grad_norm=float(gnorm),
                    tokens=self.tokens_seen,
                    elapsed=round(self.elapsed, 2),
                )
                bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.2e}")
            if cfg.time_budget_min is not None and self.max_steps is None:
                if session == 3:  # skip the first steps (allocator / kernel warm-up)
                    calib_t0 = (self.elapsed, self.step)
                elif calib_t0 is not None and session == 3 + cfg.calib_steps:
                    self.plan((self.elapsed - calib_t0[0]) / (self.step - calib_t0[1]))
                    bar.total = self.max_steps
            if vwin is not None and (self.step % cfg.eval_interval == 0 or self.step == self.max_steps):
                t1 = time.monotonic()
                vl = evaluate_windows(model, vwin, cfg, B)
                self.elapsed += time.monotonic() - t1
                self.log(
                    kind="val", step=self.step, val_loss=vl, tokens=self.tokens_seen, elapsed=round(self.elapsed, 2)
                )
                tqdm.write(f"step {self.step}: train {lv:.4f}  val {vl:.4f}  ppl {math.exp(vl):.1f}  lr {lr:.2e}")
                if cfg.time_budget_min is not None and self.max_steps is not None:
                    now = time.monotonic()
                    per = (now - interval_t0) / max(1, self.step - interval_s0)  # includes eval/save overhead
                    interval_t0, interval_s0 = now, self.step
                    self.plan(per)
                    bar.total = self.max_steps
            done = self.max_steps is not None and self.step >= self.max_steps
            over = cfg.time_budget_min is not None and self.elapsed > cfg.time_budget_min * 60.0
            stop = stop_after is not None and self.step >= stop_after
            if done or over or stop or time.monotonic() - last_save > cfg.ckpt_interval_min * 60.0:
                t1 = time.monotonic()
                if over and not done:
                    self.max_steps = self.step  # the budget ran out: this is the final checkpoint
                self.save()
                self.elapsed += time.monotonic() - t1
                last_save = time.monotonic()
            if done or over or stop:
                break
        bar.close()
        return losses


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> list[float]:
    """Train (or resume) the run in cfg.out_dir; returns this session's per-step losses."""
    return Trainer(cfg, resume=resume).run(stop_after=stop_after)
