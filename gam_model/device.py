"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device`. On CUDA through pinned memory, without blocking: a copy from pageable memory
    makes the host wait until the stream has drained, which would stall a launch behind the work queued before it
    (the overlap scheduler, gam_model/batch.py)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
