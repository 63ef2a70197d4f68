"""Learning-rate schedules as multipliers of the peak rate (for torch's LambdaLR)."""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("constant", "cosine")


def warmup_then(
    schedule: str, warmup_steps: int, warmup_start_ratio: float, max_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Linear warmup from `warmup_start_ratio` of the peak to the peak, then constant or cosine decay.

    The paper's recipe is warmup_steps=20, warmup_start_ratio=0.1, then constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
