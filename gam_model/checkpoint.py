"""Checkpoint directories (DESIGN 1.4): config.json + model.safetensors + tokenizer.json + README.md.

Serving never unpickles: weights are read with safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gam_model import quant
from gam_model.config import ConfigError, GAMConfig
from gam_model.model import GAM
from gam_model.tokenizer import Tokenizer

FORMAT_VERSION = 1
TIED = "head.weight"  # tied to token_embedding.weight; not stored twice


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or does not match its config."""


@dataclass
class CheckpointMeta:
    """What config.json holds beside the hyper-parameters."""

    model_name: str = "gam"
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, str] | None = None  # set by gam-quantize: method and dtype (gam_model.quant.describe)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(directory: str | Path, model: GAM, tokenizer: Tokenizer | None, meta: CheckpointMeta) -> Path:
    """Write model + config (+ tokenizer) to `directory` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # clone: a quantized model's gate and memory-bank rows are views of one fused tensor (safetensors wants no sharing)
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k != TIED}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt", "gam_format_version": str(FORMAT_VERSION)})
    cfg = {
        "architecture": "GAM",
        "format_version": FORMAT_VERSION,
        "model_name": meta.model_name,
        **model.config.to_dict(),
        "eos_token_id": meta.eos_token_id,
        "bos_token_id": meta.bos_token_id,
        "special_tokens": meta.special_tokens,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **({"quantization": meta.quantization} if meta.quantization else {}),
        **meta.extra,
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(d / "tokenizer.json")
    return d


def find_single_checkpoint(weights_dir: str | Path, hint: str = "pass --model DIR") -> Path:
    """The one checkpoint directory (holding a config.json) under `weights_dir`: the bundled-model rule."""
    found = sorted(p.parent for p in Path(weights_dir).glob("*/config.json"))
    if len(found) != 1:
        what = "no model" if not found else f"{len(found)} models ({', '.join(p.name for p in found)})"
        raise CheckpointError(f"{weights_dir} holds {what}; {hint}")
    return found[0]


def read_config(directory: str | Path) -> tuple[GAMConfig, CheckpointMeta]:
    """Parse config.json of a checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a gam-serve checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
        cfg = GAMConfig.from_dict(raw)
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    for key in ("eos_token_id", "bos_token_id"):  # None (absent) or a token id of the model
        tid = raw.get(key)
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < cfg.vocab_size):
            raise CheckpointError(f"{path}: {key} must be a token id in [0, {cfg.vocab_size}), got {tid!r}")
    known = {
        "architecture",
        "format_version",
        "model_name",
        "eos_token_id",
        "bos_token_id",
        "special_tokens",
        "torch_dtype",
        "quantization",
        *cfg.to_dict(),
    }
    meta = CheckpointMeta(
        model_name=raw.get("model_name", Path(directory).resolve().name),
        eos_token_id=raw.get("eos_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        special_tokens=raw.get("special_tokens") or {},
        quantization=raw.get("quantization"),
        extra={k: v for k, v in raw.items() if k not in known},
    )
    return cfg, meta


def load_state_dict_into(model: GAM, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Copy sd into model (or, with assign, take its tensors), with a clear error for every missing, unexpected,
    mis-shaped or (for quantized weights) mis-typed tensor."""
    state = {k: v for k, v in model.state_dict().items() if k != TIED}
    expected = {k: v.shape for k, v in state.items()}
    problems = []
    for k, shape in expected.items():
        if k not in sd:
            problems.append(f"missing tensor {k} {tuple(shape)}")
        elif tuple(sd[k].shape) != tuple(shape):
            problems.append(f"{k} has shape {tuple(sd[k].shape)}, config expects {tuple(shape)}")
        elif not state[k].is_floating_point() and sd[k].dtype != state[k].dtype:
            problems.append(f"{k} is {sd[k].dtype}, the quantization needs {state[k].dtype}")
    problems += [f"unexpected tensor {k}" for k in sd if k not in expected and k != TIED]
    if TIED in sd and "token_embedding.weight" in sd and not torch.equal(sd[TIED], sd["token_embedding.weight"]):
        problems.append("head.weight differs from token_embedding.weight (GAM ties them)")
    if problems:
        raise CheckpointError(f"{source} does not match its config:\n  " + "\n  ".join(problems[:20]))
    if assign:  # into a meta-device skeleton: the file's tensors become the model's, cast to its dtype
        sd = {k: v if not v.is_floating_point() else v.to(state[k].dtype) for k, v in sd.items()}
    model.load_state_dict({k: v for k, v in sd.items() if k != TIED}, strict=False, assign=assign)


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantize: str = "auto",
) -> tuple[GAM, Tokenizer, CheckpointMeta]:
    """Load a checkpoint directory into an eval-mode model; safetensors only (no pickle).

    dtype None = auto (gam_model.quant.default_dtype; a pre-quantized checkpoint's own dtype). quantize: "auto" (as the
    checkpoint is), "none", "int8" or "fp8" (quantized at load); a combination that cannot be served raises a
    CheckpointError before any weight is read (gam_model.quant.resolve).
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg, meta = read_config(d)
    wpath = d / "model.safetensors"
    if not wpath.is_file():
        pickles = sorted(p.name for p in d.glob("*.pt*")) + sorted(p.name for p in d.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: convert it with gam-import; pickles are never loaded)" if pickles else ""
        raise CheckpointError(f"{directory}: no model.safetensors{hint}")
    tok = load_tokenizer(d, cfg, meta)
    device = torch.device(device)
    try:
        method, dtype = quant.resolve(quantize, meta.quantization, dtype, device)
    except quant.QuantizationError as e:
        raise CheckpointError(f"{directory}: {e}") from e
    if meta.quantization is not None:  # pre-quantized: no random init, no full-precision projections
        with torch.device("meta"):
            model = quant.quantized_skeleton_(GAM(cfg).to(dtype), method, quant.tied_embedding(meta.quantization))
        load_state_dict_into(model, load_file(str(wpath)), str(wpath), assign=True)
        model = model.to(device).eval()
    else:
        model = GAM(cfg)
        load_state_dict_into(model, load_file(str(wpath)), str(wpath))
        model = model.to(device=device, dtype=dtype).eval()
        if method != "none":
            quant.quantize_model_(model, method)
    return model, tok, meta


def load_tokenizer(directory: str | Path, cfg: GAMConfig, meta: CheckpointMeta) -> Tokenizer:
    """A checkpoint directory's tokenizer.json with its config's eos/bos ids, checked against the model's vocabulary
    (CheckpointError naming the file when it is missing, unreadable or larger than the vocabulary)."""
    tpath = Path(directory) / "tokenizer.json"
    if not tpath.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(tpath, meta.eos_token_id, meta.bos_token_id)
    except Exception as e:  # the tokenizers library's own message does not name the file
        raise CheckpointError(f"{tpath}: not a readable Hugging Face tokenizer: {e}") from e
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tpath}: tokenizer has {tok.vocab_size} tokens, model vocab_size is {cfg.vocab_size}")
    return tok
