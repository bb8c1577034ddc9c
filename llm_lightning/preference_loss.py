"""Preference losses, per pair, from policy and reference log-probabilities (no model here).

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)):

- ``sigmoid`` (DPO, Rafailov et al., 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),
  eps = ``label_smoothing`` (conservative DPO);
- ``ipo`` (Azar et al., 2023): (h - 1 / (2 beta))^2, on log-probabilities averaged per answer token,
  as the IPO paper defines them (the caller averages);
- ``hinge`` (SLiC): max(0, 1 - beta h).
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
