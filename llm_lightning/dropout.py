"""Dropout whose CPU mask takes a quarter of the random numbers ``F.dropout`` draws.

PyTorch's CPU generator is a Mersenne Twister run on one thread, one draw per element, and
``F.dropout`` draws a random float for every element: on a 1,024 x 576 activation it took 3.7 ms
on a 2-core Zen 5 EPYC (2.6 ms limited to AVX2), where multiplying the same tensor by a number
takes 0.03 ms. LoRA drops the input of every adapted layer (p=0.05 in ``conf/lora``), so a
training step of SmolLM2 with adapters on wq and wv pays for 60 such masks, as PEFT's does.

A drop decision needs 16 random bits, not a float: each 64-bit draw of the same generator gives
four 16-bit lanes, so the mask takes a quarter of the draws.
An element is dropped when its lane falls in the lowest ``round(p * 65536)`` of its 65,536 values,
so the rate used is p rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the kept
elements are scaled by 1 / (1 - that rate): the output's expectation is the input, exactly.
The backward pass keeps only the boolean mask, as ``F.dropout`` does.

The draws come from the default CPU generator, so ``torch.manual_seed`` (Lightning's ``seed``)
makes the masks repeat. Elsewhere (GPUs, whose dropout kernels draw in parallel, and under
``torch.compile``, which generates its own random numbers) this is ``F.dropout``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LANE_VALUES = 1 << 16


def drop_count(p: float) -> int:
    """How many of a lane's 65,536 values mean "drop": p rounded to a multiple of 1/65536."""
    return round(p * LANE_VALUES)


def effective_rate(p: float) -> float:
    """The drop rate this module uses for a requested ``p``."""
    return drop_count(p) / LANE_VALUES


def keep_mask(numel: int, p: float) -> torch.Tensor:
    """``numel`` independent booleans [numel], each False with probability ``effective_rate(p)``."""
    draws = torch.empty(math.ceil(numel / 4), dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits
    # Each int16 lane runs from -32768 up: the lowest drop_count(p) of its values are dropped.
    return (draws.view(torch.int16)[:numel] >= drop_count(p) - LANE_VALUES // 2)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the CPU mask drawn as the module docstring says."""
    if not training or p == 0.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    if drop_count(p) in (0, LANE_VALUES):  # under 1/131072 from 0 or 1: all kept, or all dropped
        return x * float(drop_count(p) == 0)
    # A product with a boolean saves only the mask for backward, as F.dropout does.
    return x * keep_mask(x.numel(), p).view(x.shape) * (1.0 / (1.0 - effective_rate(p)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same place in a model) whose forward is ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
