"""GAM hyper-parameters: the paper's `GAM_Model` config, validated, with JSON load/save."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class GAMConfig:
    """Model hyper-parameters. Defaults are the paper's (VOCAB_SIZE..CONV_KERNEL_SIZE)."""

    vocab_size: int = 10000
    block_size: int = 256
    n_embd: int = 512
    n_layer: int = 6
    n_slots: int = 512  # memory-bank rows per block (NUM_MEMORY_SLOTS)
    conv_kernel: int = 3
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "dropout":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                    raise ConfigError(f"dropout must be a number in [0, 1), got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {v!r}")
        if self.conv_kernel < 2:
            raise ConfigError(f"conv_kernel must be >= 2 (a kernel of 1 has no history), got {self.conv_kernel}")
        if self.block_size < self.receptive_field:
            raise ConfigError(
                f"block_size ({self.block_size}) must be >= the receptive field "
                f"n_layer*(conv_kernel-1)+1 = {self.receptive_field}"
            )

    @property
    def receptive_field(self) -> int:
        """R: logits at t depend on tokens t-R+1..t only."""
        return self.n_layer * (self.conv_kernel - 1) + 1

    @property
    def history(self) -> int:
        """k-1: normalized conv inputs each layer keeps per sequence."""
        return self.conv_kernel - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GAMConfig:
        """Build from a dict, ignoring keys that are not hyper-parameters (e.g. checkpoint metadata)."""
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "block_size", "n_embd", "n_layer", "n_slots", "conv_kernel") if n not in d]
        if missing:
            raise ConfigError(f"config is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GAMConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d)

    def num_params(self) -> int:
        """Parameter count (head tied to the token embedding)."""
        d, L = self.n_embd, self.n_layer
        per_block = d * self.conv_kernel + d + self.n_slots * d + (2 * d * d + 2 * d) + (8 * d * d + 5 * d) + 4 * d
        return self.vocab_size * d + self.block_size * d + L * per_block + 2 * d
