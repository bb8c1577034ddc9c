"""The closed-form warmup + cosine schedule: torch's chained schedulers' values, and a resume
with a new step budget that follows the new budget instead of restarting the cosine."""

import pytest
import torch

from llm_lightning.lr_schedule import apply_current_rate, warmup_cosine


def _optimizer(lr: float = 3e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _rates(scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 3])
def test_values_equal_torch_linear_warmup_then_cosine_annealing(warmup):
    total, min_lr = 12, 1e-5
    reference_optimizer = _optimizer()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=total - warmup, eta_min=min_lr)
    reference = cosine if warmup == 0 else torch.optim.lr_scheduler.SequentialLR(
        reference_optimizer, [torch.optim.lr_scheduler.LinearLR(
            reference_optimizer, start_factor=1 / (warmup + 1), total_iters=warmup), cosine], milestones=[warmup])
    ours = warmup_cosine(_optimizer(), warmup_steps=warmup, total_steps=total, min_lr=min_lr)
    assert _rates(ours, total) == pytest.approx(_rates(reference, total), rel=1e-9, abs=1e-12)


def test_resume_with_a_larger_budget_follows_the_new_schedule_and_the_end_holds_min_lr():
    short = warmup_cosine(_optimizer(), warmup_steps=2, total_steps=8, min_lr=1e-5)
    _rates(short, 8)
    assert short.get_last_lr() == [pytest.approx(1e-5)]
    assert _rates(short, 5) == pytest.approx([1e-5] * 5)  # past the budget: no second cosine

    saved = warmup_cosine(_optimizer(), warmup_steps=2, total_steps=8, min_lr=1e-5)
    _rates(saved, 4)
    longer = warmup_cosine(_optimizer(), warmup_steps=2, total_steps=16, min_lr=1e-5)
    longer.optimizer.load_state_dict(saved.optimizer.state_dict())  # as a checkpoint restores both
    longer.load_state_dict(saved.state_dict())
    apply_current_rate(longer)
    fresh = warmup_cosine(_optimizer(), warmup_steps=2, total_steps=16, min_lr=1e-5)
    assert _rates(longer, 12) == pytest.approx(_rates(fresh, 16)[4:], rel=1e-12)
