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
from llm_lightning.linear_cross_entropy import LogitsBuffer, linear_cross_entropy
from llm_lightning.model import LLaMA

#: How a step's summed loss is normalised (``LoRAFineTuner``): by the epoch's mean terms per step, or the window's own.
TOKEN_WEIGHTINGS = ("epoch", "window")


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


def _has_fused_head(model: LLaMA) -> bool:
    """Whether the output head can be fused with the loss: a plain or tied linear head, not a
    LoRA-adapted or quantized one."""
    return model.output is None or type(model.output) in (nn.Linear, Linear)


def _head_weight(model: LLaMA) -> torch.Tensor:
    """The output head's weight, read after ``hidden_states``: under FSDP that call is what
    gathers the root's weights, which are shards before it (``fsdp.py``)."""
    return model.tok_embeddings.weight if model.output is None else model.output.weight


def model_nll(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, *, positions: torch.Tensor | None = None,
              document_ids: torch.Tensor | None = None,
              logits_buffer: LogitsBuffer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, supervised positions) of ``model`` on a batch, without materialising its logits.
    ``positions`` and ``document_ids`` come with packed rows; a loop that calls this every step
    passes the same ``logits_buffer`` each time (``linear_cross_entropy``).

    The output head is fused with the loss (``linear_cross_entropy``), which skips unsupervised
    positions and works a chunk at a time. Any other head (LoRA-adapted, quantized) has no fused
    path and goes through the full logits."""
    if not _has_fused_head(model):
        return token_nll(model(input_ids, positions=positions, document_ids=document_ids), labels)
    targets = next_token_targets(labels).flatten()
    hidden = model.hidden_states(input_ids, positions=positions, document_ids=document_ids).flatten(0, 1)
    loss_sum = linear_cross_entropy(hidden, _head_weight(model), targets, ignore_index=IGNORE_INDEX,
                                    buffer=logits_buffer)
    return loss_sum, (targets != IGNORE_INDEX).sum()


def sequence_log_probs(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, *,
                       logits_buffer: LogitsBuffer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's supervised tokens [B], their count [B]): what
    preference losses compare. Fused with the head row by row, as ``model_nll`` is, every row
    sharing ``logits_buffer`` (one is made for the call when none is given)."""
    targets = next_token_targets(labels)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if not _has_fused_head(model):
        logits = model(input_ids).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.view_as(targets).sum(dim=1), counts
    hidden = model.hidden_states(input_ids)
    head, buffer = _head_weight(model), logits_buffer or LogitsBuffer()
    return -torch.stack([linear_cross_entropy(row, head, target, ignore_index=IGNORE_INDEX, buffer=buffer)
                         for row, target in zip(hidden, targets)]), counts
