"""Next-token negative log-likelihood of a batch: the one loss training, validation and evaluation share.

Labels are the input ids with unsupervised positions (prompt, padding) set to ``IGNORE_INDEX``;
position t predicts label t + 1. Both functions return (summed NLL, number of supervised
positions) so callers can normalise over whatever window they need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning.data.encoding import IGNORE_INDEX
from llm_lightning.linear import Linear
from llm_lightning.linear_cross_entropy import linear_cross_entropy
from llm_lightning.model import LLaMA


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted one to the left, the last position ignored. Shifting the labels rather than
    slicing ``logits[:, :-1]`` spares autograd a zero-filled full-vocabulary tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, supervised positions) from full logits [B, T, vocab]: the reference path."""
    targets = next_token_targets(labels)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def model_nll(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, *, positions: torch.Tensor | None = None,
              document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, supervised positions) of ``model`` on a batch, without materialising its logits.
    ``positions`` and ``document_ids`` come with packed rows.

    The output head is fused with the loss (``linear_cross_entropy``), which skips unsupervised
    positions and works a chunk at a time. Any other head (LoRA-adapted, quantized) has no fused
    path and goes through the full logits."""
    if model.output is not None and type(model.output) not in (nn.Linear, Linear):
        return token_nll(model(input_ids, positions=positions, document_ids=document_ids), labels)
    targets = next_token_targets(labels).flatten()
    hidden = model.hidden_states(input_ids, positions=positions, document_ids=document_ids).flatten(0, 1)
    head = model.tok_embeddings.weight if model.output is None else model.output.weight
    loss_sum = linear_cross_entropy(hidden, head, targets, ignore_index=IGNORE_INDEX)
    return loss_sum, (targets != IGNORE_INDEX).sum()
