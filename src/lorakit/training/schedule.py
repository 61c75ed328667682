"""Learning-rate schedule: linear warmup, then cosine decay to `floor` x the peak."""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
