"""Import the paper's reference checkpoints (`torch.save(model.state_dict())`) into a checkpoint directory.

The `.pt` is read with `torch.load(weights_only=True)`, so a pickle holding anything but tensors and plain
containers is refused. Hyper-parameters come from explicit values, then a hparams JSON (the reference's
`ModelConfig` upper-case names or `GAMConfig` lower-case ones), then the tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gam_model.checkpoint import CheckpointError, CheckpointMeta, load_state_dict_into, save_checkpoint
from gam_model.config import ConfigError, GAMConfig
from gam_model.model import GAM
from gam_model.tokenizer import Tokenizer

WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "module", "ema_state_dict")
PREFIXES = ("_orig_mod.", "module.", "model.")  # torch.compile, DataParallel/DDP, Lightning-style wrappers
EOS_CANDIDATES = ("[EOS]", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
HPARAM_ALIASES = {  # every accepted spelling (compared lower-case) -> GAMConfig field
    "vocab_size": "vocab_size",
    "block_size": "block_size",
    "n_embed": "n_embd",
    "n_embd": "n_embd",
    "n_layer": "n_layer",
    "n_layers": "n_layer",
    "num_memory_slots": "n_slots",
    "n_slots": "n_slots",
    "conv_kernel_size": "conv_kernel",
    "conv_kernel": "conv_kernel",
    "dropout": "dropout",
}


def load_reference_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of a reference `.pt` (unwrapped, prefixes stripped) and any hyper-parameters stored beside them."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError
        raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True): {e}") from e
    hparams: dict[str, Any] = {}
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("config", "model_config", "hparams", "hyper_parameters", "args"):
            if isinstance(obj.get(key), Mapping):
                hparams = {**dict(obj[key]), **hparams}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {', '.join(map(str, obj))[:200]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        sd[strip_prefixes(str(k))] = v
    return sd, hparams


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(name: str) -> str:
    """Drop wrapper prefixes (`_orig_mod.`, `module.`, ...) however they are nested."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


def normalize_hparams(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map the reference's hyper-parameter names (any case) onto GAMConfig fields; nested config dicts allowed."""
    for key in ("config", "model_config", "model"):
        if isinstance(raw.get(key), Mapping):
            raw = {**raw, **raw[key]}
    return {HPARAM_ALIASES[k.lower()]: v for k, v in raw.items() if isinstance(k, str) and k.lower() in HPARAM_ALIASES}


def infer_hparams(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Hyper-parameters readable from tensor shapes (dropout is not; it does not matter for inference)."""
    out: dict[str, int] = {}
    if (t := sd.get("token_embedding.weight")) is not None and t.dim() == 2:
        out["vocab_size"], out["n_embd"] = t.shape
    if (t := sd.get("pos_embedding.weight")) is not None and t.dim() == 2:
        out["block_size"] = t.shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers:
        out["n_layer"] = max(layers) + 1
    if (t := sd.get("blocks.0.memory_bank")) is not None and t.dim() == 2:
        out["n_slots"] = t.shape[0]
    if (t := sd.get("blocks.0.causal_conv.weight")) is not None and t.dim() == 3:
        out["conv_kernel"] = t.shape[-1]
    return out


def build_config(sd: Mapping[str, torch.Tensor], hparams: Mapping[str, Any], overrides: Mapping[str, Any]) -> GAMConfig:
    """Config from overrides > hparams > shapes; a clear CheckpointError when something is missing or invalid."""
    values: dict[str, Any] = {**infer_hparams(sd), **normalize_hparams(hparams)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GAMConfig.from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"cannot build the model config: {e}") from e


def find_eos(tok: Tokenizer, eos_token: str | None) -> tuple[int | None, str | None]:
    """The eos id: the named token (which must exist) or the first common eos spelling in the vocabulary."""
    if eos_token is not None:
        i = tok.token_to_id(eos_token)
        if i is None:
            raise CheckpointError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")
        return i, eos_token
    for name in EOS_CANDIDATES:
        if (i := tok.token_to_id(name)) is not None:
            return i, name
    return None, None


def import_reference(
    state_dict_path: str | Path,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    hparams_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    eos_token: str | None = None,
) -> Path:
    """Convert a reference `.pt` + tokenizer.json into a checkpoint directory; returns the directory."""
    sd, stored = load_reference_state_dict(state_dict_path)
    hparams = dict(stored)
    if hparams_path is not None:
        try:
            loaded = json.loads(Path(hparams_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{hparams_path}: cannot read hyper-parameters: {e}") from e
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{hparams_path}: expected a JSON object")
        hparams.update(loaded)
    cfg = build_config(sd, hparams, overrides or {})
    if cfg.dropout != 0.0:  # dropout is training-only; the served model never applies it
        cfg = GAMConfig(**{**cfg.to_dict(), "dropout": 0.0})
    model = GAM(cfg)
    load_state_dict_into(model, {k: v.float() for k, v in sd.items()}, str(state_dict_path))
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # tokenizers raises a plain Exception for unreadable files
        raise CheckpointError(f"{tokenizer_path}: cannot load the tokenizer: {e}") from e
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer_path}: tokenizer has {tok.vocab_size} tokens, model vocab_size is {cfg.vocab_size}"
        )
    eos_id, eos_name = find_eos(tok, eos_token)
    tok.eos_token_id = eos_id
    digest = hashlib.sha256(Path(state_dict_path).read_bytes()).hexdigest()
    meta = CheckpointMeta(
        model_name=name or Path(out_dir).resolve().name,
        eos_token_id=eos_id,
        special_tokens={"eos_token": eos_name} if eos_name else {},
        extra={"imported_from": {"file": Path(state_dict_path).name, "sha256": digest}},
    )
    out = save_checkpoint(out_dir, model.eval(), tok, meta)
    readme = out / "README.md"
    if not readme.exists():
        readme.write_text(
            f"# {meta.model_name}\n\nImported with `gam-import` from the reference GAM checkpoint "
            f"`{Path(state_dict_path).name}` (sha256 `{digest}`).\n\n"
            f"Hyper-parameters: {json.dumps(cfg.to_dict())}. Parameters: {cfg.num_params():,}.\n"
            f"Eos token: {eos_name!r} (id {eos_id}).\n"
        )
    return out
