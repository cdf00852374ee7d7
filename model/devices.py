"""Which torch device a command runs on: the one resolver behind `--device`, `VAD_DEVICE` and training."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What --device and VAD_DEVICE accept.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(requested: str | None) -> torch.device:
    """``auto`` (or nothing) -> cuda when torch sees a GPU, else cpu. Raises ValueError for a device
    this machine cannot use, naming it."""
    import torch  # here: `vad --help` and the server's settings check device names without loading torch

    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.match(requested):
        raise ValueError(f"device {requested!r} is not one of auto, cpu, mps, cuda, cuda:N")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested} asked for (VAD_DEVICE, --device), but CUDA is not available")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {requested} asked for (VAD_DEVICE, --device), but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for (VAD_DEVICE, --device), but MPS is not available")
    return torch.device(requested)
