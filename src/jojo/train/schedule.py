"""Learning-rate schedules: a multiplier of the peak LR as a function of the step (or, under a time budget,
of `progress`, the fraction of the budget left after warm-up that has passed, so the decay and the end land at
the deadline whatever the machine's speed; warm-up stays in steps).

- cosine:   linear warmup, then cosine decay from 1 to min_lr_ratio at the last step.
- wsd:      warmup-stable-decay: linear warmup, constant, then a linear decay to min_lr_ratio over the last
            `decay_fraction` of the run (as MiniCPM and modded-nanogpt use; a run can be extended from
            any checkpoint taken before the decay).
- constant: linear warmup, then constant.
"""

from __future__ import annotations

import math

from jojo.config import ScheduleConfig


def lr_multiplier(
    step: int, total_steps: int, cfg: ScheduleConfig, progress: float | None = None, warmup_over: bool = False
) -> float:
    if progress is not None:
        return _by_progress(step, cfg, progress, warmup_over)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant" or total_steps <= warmup:
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        progress = min((step - warmup) / max(total_steps - 1 - warmup, 1), 1.0)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - lo) * progress


def _by_progress(step: int, cfg: ScheduleConfig, progress: float, warmup_over: bool = False) -> float:
    """The schedule over a time budget: warm-up for `warmup_steps` steps (or until the caller says it is over:
    the loop ends it by half the budget), then the decay shape over `progress` in [0, 1], the time after warm-up
    (cosine over all of it; wsd over its last `decay_fraction`)."""
    if not warmup_over and cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    lo, p = cfg.min_lr_ratio, min(max(progress, 0.0), 1.0)
    if cfg.decay == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    start = 1.0 - cfg.decay_fraction
    return 1.0 if p < start else 1.0 - (1.0 - lo) * min((p - start) / cfg.decay_fraction, 1.0)
