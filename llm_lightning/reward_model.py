"""A Bradley-Terry reward model (``stage=rm``) on the LoRA fine-tuner.

The reward of a sequence is a scalar head (``score``, a bias-free ``dim -> 1`` linear, as in
transformers' ``LlamaForSequenceClassification``) read at the last token that is not padding, on
the LLaMA trunk's final hidden states; the trunk carries LoRA. Training fits P(chosen > rejected)
= sigma(r(chosen) - r(rejected) - margin) on preference pairs: the loss is -log sigma(...), with
a record's ``margin`` where it gives one (Llama 2's margin loss), else 0. LoRA and the head are
trained; the head starts at zero, so every reward starts at 0 and the first loss is exactly log 2.

"Last non-pad token" is the rightmost position whose id is not the pad id, the rule transformers
applies to ``pad_token_id``: so the export (``hf_format.save_hf_checkpoint`` with the head) gives
the scores this module gives. The rest (accumulation, checkpoints, resume, logging) is
``LoRAFineTuner``'s; checkpoints add the head (``score.weight``) to the LoRA tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_lightning.config import LLaMAConfig
from llm_lightning.data.batching import collate
from llm_lightning.data.encoding import Example
from llm_lightning.lora import is_lora_parameter
from llm_lightning.model import LLaMA
from llm_lightning.module import LoRAFineTuner
from llm_lightning.preference_loss import bradley_terry_loss, reward_metrics

HEAD_KEY = "score.weight"  # in the LightningModule's (and the checkpoint's) state dict, as in transformers


def score_head(config: LLaMAConfig) -> nn.Linear:
    """A zero, fp32 head: all rewards start equal (the loss at log 2), whatever the trunk."""
    head = nn.Linear(config.dim, 1, bias=False, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    return head


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row, the rightmost position whose id is not ``pad_id`` (0 for a row of padding)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(dim=-1)


def rewards(model: LLaMA, head: nn.Linear, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The reward of each row [B], in the head's dtype (fp32)."""
    hidden = model.hidden_states(input_ids)
    last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(input_ids, pad_id)]
    return head(last.to(head.weight.dtype)).squeeze(-1)


class RewardModelFineTuner(LoRAFineTuner):
    stage = "rm"
    reports_perplexity = False
    uses_lm_head = False

    def __init__(self, model: LLaMA, *, pad_id: int, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.score = score_head(model.config).to(model.tok_embeddings.weight.device)
        self.pad_id = pad_id

    @staticmethod
    def is_checkpointed(name: str) -> bool:
        return is_lora_parameter(name) or name == HEAD_KEY

    def loss_terms(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = rewards(self.model, self.score, batch["input_ids"], self.pad_id)
        pairs = len(scores) // 2
        chosen, rejected = scores[:pairs], scores[pairs:]
        losses = bradley_terry_loss(chosen, rejected, batch.get("margins"))
        self.log_stage_metrics(stage, reward_metrics(chosen, rejected), pairs)
        return losses.sum(), torch.tensor(pairs, device=losses.device)


@torch.no_grad()
def score_sequences(model: LLaMA, head: nn.Linear, sequences: list[Example], pad_id: int,
                    batch_size: int) -> list[float]:
    """The reward of each sequence, a batch at a time (right-padded, so the batch does not change a score)."""
    device = head.weight.device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], pad_id=pad_id)
        scores += rewards(model, head, batch["input_ids"].to(device), pad_id).double().cpu().tolist()
    return scores
