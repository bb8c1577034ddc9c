"""Preference losses, per pair, from policy and reference log-probabilities (no model here).

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)):

- ``sigmoid`` (DPO, Rafailov et al., 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),
  eps = ``label_smoothing`` (conservative DPO);
- ``ipo`` (Azar et al., 2023): (h - 1 / (2 beta))^2, on log-probabilities averaged per answer token,
  as the IPO paper defines them (the caller averages);
- ``hinge`` (SLiC): max(0, 1 - beta h).

The reward model's Bradley-Terry loss, -log sigma(r_chosen - r_rejected - margin), is here too
(``bradley_terry_loss``), and the reward statistics both log (``reward_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type}: expected one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta}: expected a number > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing}: expected a number in [0, 0.5)")


def preference_logits(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """h per pair, from log-probabilities laid out as the batch is: [chosen..., rejected...]."""
    pairs = len(policy) // 2
    ratios = policy - reference.to(policy.dtype)
    return ratios[:pairs] - ratios[pairs:]


def dpo_loss(logits: torch.Tensor, config: DPOConfig) -> torch.Tensor:
    """The loss of each pair, from its h (``preference_logits``)."""
    beta = config.beta
    if config.loss_type == "sigmoid":
        smoothing = config.label_smoothing
        return -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)
    if config.loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * logits)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margins: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigma(r_chosen - r_rejected - margin), per pair."""
    difference = chosen - rejected
    if margins is not None:
        difference = difference - margins.to(difference.dtype)
    return -F.logsigmoid(difference)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """How often chosen scores above rejected, a tie counting half: a model that cannot tell the
    answers apart (the policy at its reference, a reward head at zero) scores 0.5."""
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over the pairs of the two rewards, their margin, and the pairwise accuracy (no gradient)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(),
            "rewards/accuracy": pairwise_accuracy(chosen, rejected).to(chosen.dtype)}
