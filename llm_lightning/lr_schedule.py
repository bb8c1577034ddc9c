"""The learning-rate schedule: linear warmup, then a cosine down to ``min_lr``, in closed form.

The values are those of torch's ``LinearLR`` (from 1/(warmup+1) of the rate up to all of it)
followed by ``CosineAnnealingLR``, but computed from the step number alone (a ``LambdaLR``), so
a checkpoint restores only the step. Resuming with another step budget (``trainer.max_steps``
raised to train longer) then follows the schedule of the new budget from the step reached,
where torch's chained schedulers would restore the old budget and, past its end, start the
cosine over. Past the end of the budget the rate stays at ``min_lr``.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """The fraction of the peak rate at optimizer step ``step`` (0-based); ``floor`` is min_lr / peak."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(step - warmup, total - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                  min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule for ``total_steps`` optimizer steps, the warmup shortened to leave one cosine step."""
    total = max(1, total_steps)
    warmup = max(0, min(warmup_steps, total - 1))

    def factor_for(peak: float):
        floor = min_lr / peak if peak > 0 else 0.0
        return lambda step: warmup_cosine_factor(step, warmup=warmup, total=total, floor=floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(group["lr"]) for group in optimizer.param_groups])


def apply_current_rate(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each parameter group's rate to the schedule's value at its restored step: a checkpoint
    restores the optimizer's last rate too, which under another budget belongs to the old schedule."""
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
