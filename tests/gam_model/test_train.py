"""gam-train: a tiny model learns the fixture, and a resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from gam_model.checkpoint import load_checkpoint
from gam_model.cli.train import main as train_main
from gam_model.train import STATE, TrainConfig, Trainer, lr_at, train

FIXTURES = Path(__file__).parent.parent / "fixtures"
TRAIN = str(FIXTURES / "wikitext2_train_excerpt.txt")
VAL = str(FIXTURES / "wikitext2_valid_excerpt.txt")


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    args = dict(
        train_file=TRAIN,
        val_file=VAL,
        out_dir=str(out),
        vocab_size=300,
        block_size=32,
        n_embd=32,
        n_layer=2,
        n_slots=16,
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        max_steps=8,
        eval_interval=4,
        eval_batches=2,
        dropout=0.1,
        threads=1,
        log_interval=1,
    )
    args.update(kw)
    return TrainConfig(**args)


def test_training_lowers_loss(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=40, eval_interval=20, dtype="fp32")
    losses = train(cfg)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    vals = [
        json.loads(r)["val_loss"]
        for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if json.loads(r)["kind"] == "val"
    ]
    assert len(vals) == 2 and vals[1] < vals[0]
    # the run directory is a serving checkpoint
    model, tok, meta = load_checkpoint(tmp_path / "run")
    assert meta.eos_token_id is not None and tok.vocab_size == model.config.vocab_size
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_the_same_run(tmp_path, dtype):
    whole = train(tiny_cfg(tmp_path / "a", dtype=dtype))
    first = train(tiny_cfg(tmp_path / "b", dtype=dtype), stop_after=5)
    assert len(first) == 5
    with (tmp_path / "b" / "log.jsonl").open("a") as f:  # a crash after the save: rows past the saved step
        f.write(json.dumps({"kind": "train", "step": 6, "loss": 0.0}) + "\n")
    t = Trainer(tiny_cfg(tmp_path / "b", dtype=dtype, lr=1.0), resume=True)  # saved settings win over new ones
    assert t.step == 5 and t.max_steps == 8 and t.cfg.lr == 3e-3
    saved = torch.load(tmp_path / "b" / STATE, weights_only=True)["optimizer"]["state"]
    for k, s in t.opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], saved[k]["exp_avg"]) and int(s["step"]) == 5
    rest = t.run()
    assert first + rest == whole  # bit-identical next losses: data order, dropout RNG, schedule, optimizer
    a = torch.load(tmp_path / "a" / STATE, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / STATE, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [json.loads(r)["step"] for r in log_a]  # no duplicated rows after the resume


def test_fresh_run_refuses_to_overwrite_and_resume_needs_state(tmp_path):
    train(tiny_cfg(tmp_path / "a", max_steps=2))
    with pytest.raises(FileExistsError):
        Trainer(tiny_cfg(tmp_path / "a"))
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_cfg(tmp_path / "none"), resume=True)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(train_file="", out_dir="", lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)


def test_time_budget_fixes_the_schedule(tmp_path):
    cfg = tiny_cfg(tmp_path / "t", max_steps=None, time_budget_min=0.05, calib_steps=3, eval_interval=1000)
    losses = train(cfg)
    state = torch.load(tmp_path / "t" / STATE, weights_only=True)
    assert state["max_steps"] is not None and state["step"] == len(losses) == state["max_steps"]
    assert state["elapsed"] > 0  # how long it took is the machine's business: the schedule is fixed by then


def test_a_schedule_fixed_after_the_budget_is_spent_ends_where_the_run_is(tmp_path):
    """Calibration that took the whole budget (a stalled machine): the schedule is the steps already made, never
    fewer (the run would go on past max_steps, its final checkpoint never written)."""
    t = Trainer(tiny_cfg(tmp_path / "t", max_steps=None, time_budget_min=0.05, calib_steps=6))
    t.step, t.elapsed = 6, 10.0  # 6 steps in 10 s, over the 3 s budget
    t.plan(sec_per_step=10.0 / 6)
    assert t.max_steps == 6


def test_cli_paper_tokenizer(tmp_path):
    out = tmp_path / "p"
    train_main(
        [
            "--train",
            TRAIN,
            "--out",
            str(out),
            "--tokenizer",
            "paper",
            "--vocab-size",
            "400",
            "--block-size",
            "16",
            "--n-embd",
            "16",
            "--n-layer",
            "2",
            "--n-slots",
            "8",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--threads",
            "1",
        ]
    )
    _, tok, meta = load_checkpoint(out)
    assert meta.special_tokens == {"bos_token": "[SOS]", "eos_token": "[EOS]"}
    assert [tok.id_to_token(i) for i in range(4)] == ["[UNK]", "[PAD]", "[SOS]", "[EOS]"]


def test_resume_can_refit_the_schedule(tmp_path):
    train(tiny_cfg(tmp_path / "r"), stop_after=3)
    budgeted = Trainer(tiny_cfg(tmp_path / "r", time_budget_min=5.0), resume=True)
    assert budgeted.max_steps == 8 and budgeted.cfg.time_budget_min == 5.0
    t = Trainer(tiny_cfg(tmp_path / "r", max_steps=12), resume=True)
    assert t.step == 3 and t.max_steps == 12 and t.cfg.time_budget_min is None
    assert len(t.run()) == 9
