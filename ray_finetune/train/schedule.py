"""Learning-rate schedule (SPEC §2): linear warmup over the first 2% of steps, then linear decay to 0."""
from __future__ import annotations

import math

WARMUP_FRACTION = 0.02


def warmup_steps(total_steps: int) -> int:
    return max(1, math.ceil(WARMUP_FRACTION * total_steps))


def lr_factor(step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = warmup_steps(total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
