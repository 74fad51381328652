"""Decode state for a pool of sequence slots: preallocated, static shapes, updated in place."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gam_model.config import GAMConfig
from gam_model.device import to_device


class SlotsExhausted(RuntimeError):
    """Every slot of the pool is in use."""


class DecodeState:
    """Per-slot recurrent state of a GAM model.

    For every slot: each layer's last K-1 ln1 outputs (the conv history), the number of tokens seen, and
    the last R token ids (for the sliding-window regime past block_size). It never grows with the
    sequence. One extra scratch slot (index `scratch`) absorbs the padded rows of a bucketed batch.
    """

    def __init__(
        self, cfg: GAMConfig, num_slots: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.config = cfg
        self.num_slots = num_slots
        self.scratch = num_slots
        n = num_slots + 1
        self.conv = torch.zeros(cfg.n_layer, n, cfg.history, cfg.n_embd, device=device, dtype=dtype)  # (L, N, K-1, C)
        self.window = torch.zeros(n, cfg.receptive_field, dtype=torch.long, device=device)  # (N, R)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)  # (N,) tokens seen
        self.lengths = np.zeros(n, dtype=np.int64)  # host mirror of pos, so no step needs a device sync
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def bytes_per_sequence(self) -> int:
        """Bytes of state one sequence holds (conv history + counter + last R ids)."""
        per = self.conv[:, 0].numel() * self.conv.element_size()
        return per + self.pos.element_size() + self.window[0].numel() * self.window.element_size()

    def allocate(self) -> int:
        """Take a free slot (its state is reset by the next prefill)."""
        if not self._free:
            raise SlotsExhausted(f"all {self.num_slots} slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        """Give a slot back to the pool."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    def index(self, slots: list[int]) -> Tensor:
        return to_device(torch.tensor(slots, dtype=torch.long), self.pos.device)
