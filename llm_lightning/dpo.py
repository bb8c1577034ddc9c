"""Direct preference optimisation (Rafailov et al., 2023) on the LoRA fine-tuner.

The policy is the base model with its adapter; the reference is the same weights with the adapter
switched off, or with a given supervised adapter (``dpo.reference``, which the policy then starts
from), so no second model is held. The reference's log-probabilities do not change during
training: they are computed once, in eval mode, before the first step (``attach_reference``) and
travel with the pairs, so each step is one forward and backward of the policy over the chosen and
rejected sequences together.

The losses (sigmoid DPO, IPO, hinge) are in ``preference_loss.py``.
Everything else (accumulation, checkpoints, resume, logging) is ``LoRAFineTuner``'s; a step's
gradient is the mean over the pairs of its window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace

import torch

from llm_lightning.data.pair_encoding import PairExample, collate_pairs
from llm_lightning.lora import lora_disabled, lora_state_dict, load_lora_state_dict
from llm_lightning.loss import sequence_log_probs
from llm_lightning.model import LLaMA
from llm_lightning.module import LoRAFineTuner
from llm_lightning.preference_loss import DPOConfig, dpo_loss, preference_logits, reward_metrics

class DPOFineTuner(LoRAFineTuner):
    stage = "dpo"
    reports_perplexity = False

    def __init__(self, model: LLaMA, *, dpo: DPOConfig, reference_adapter: Mapping[str, torch.Tensor] | None = None,
                 reference_path: str | None = None, reference_batch_size: int = 8, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.dpo = dpo
        self.reference_adapter = reference_adapter
        self.reference_path = reference_path  # where reference_adapter came from, for evaluate
        self.reference_batch_size = reference_batch_size

    def _log_probs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probabilities of every sequence of the batch (per token for IPO)."""
        policy, counts = sequence_log_probs(self.model, batch["input_ids"], batch["labels"],
                                            logits_buffer=self.logits_buffer)
        reference = batch["reference_log_probs"]
        if self.dpo.loss_type == "ipo":
            policy, reference = policy / counts.clamp(min=1), reference / counts.clamp(min=1)
        return policy, reference

    def loss_terms(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        if "reference_log_probs" not in batch:
            raise RuntimeError("DPO batches need the reference log-probabilities: call attach_reference first")
        policy, reference = self._log_probs(batch)
        logits = preference_logits(policy, reference)
        losses = dpo_loss(logits, self.dpo)
        pairs = len(logits)
        rewards = self.dpo.beta * (policy - reference.to(policy.dtype)).detach()
        metrics = {**reward_metrics(rewards[:pairs], rewards[pairs:]),
                   "logps/chosen": policy[:pairs].detach().mean(), "logps/rejected": policy[pairs:].detach().mean()}
        self.log_stage_metrics(stage, metrics, pairs)
        return losses.sum(), torch.tensor(pairs, device=losses.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo"] = {**asdict(self.dpo), "reference": self.reference_path}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.attach_reference()

    def on_validation_start(self) -> None:
        self.attach_reference()

    @torch.no_grad()
    def attach_reference(self) -> None:
        """Give every pair of the data module (training and validation) the reference model's
        log-probabilities of its two answers, computed once, in eval mode."""
        datamodule = self.trainer.datamodule
        if all(p.reference is not None for p in datamodule.train_examples + datamodule.val_examples):
            return
        training = self.model.training
        self.model.eval()
        try:
            if self.reference_adapter is None:
                with lora_disabled(self.model):
                    self._score_all(datamodule)
            else:
                policy = {k: v.clone() for k, v in lora_state_dict(self.model).items()}
                load_lora_state_dict(self.model, self.reference_adapter)
                try:
                    self._score_all(datamodule)
                finally:
                    load_lora_state_dict(self.model, policy)
        finally:
            self.model.train(training)

    def _score_all(self, datamodule) -> None:
        for pairs in (datamodule.train_examples, datamodule.val_examples):
            # In place: the data loaders, built before fit starts, hold these very lists.
            pairs[:] = reference_log_probs(self.model, pairs, datamodule.tokenizer.pad_id, self.reference_batch_size)


@torch.no_grad()
def pair_log_probs(model: LLaMA, pairs: list[PairExample], pad_id: int,
                   batch_size: int) -> list[tuple[float, float, int, int]]:
    """Per pair, ``model``'s summed log-probabilities of its chosen and rejected answers, and their
    token counts: (chosen, rejected, chosen tokens, rejected tokens)."""
    device = next(model.parameters()).device
    scored = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_pairs(chunk, pad_id=pad_id)
        log_probs, counts = sequence_log_probs(model, batch["input_ids"].to(device), batch["labels"].to(device))
        log_probs, counts, n = log_probs.double().cpu().tolist(), counts.cpu().tolist(), len(chunk)
        scored += [(log_probs[i], log_probs[n + i], counts[i], counts[n + i]) for i in range(n)]
    return scored


def reference_log_probs(model: LLaMA, pairs: list[PairExample], pad_id: int, batch_size: int) -> list[PairExample]:
    """The pairs, each with ``model``'s summed log-probabilities of its chosen and rejected answers."""
    scored = pair_log_probs(model, pairs, pad_id, batch_size)
    return [replace(p, reference=(chosen, rejected)) for p, (chosen, rejected, _, _) in zip(pairs, scored)]
