"""The LightningModule: LoRA fine-tuning with a token-exact loss across gradient accumulation.

Lightning divides every micro-batch loss by ``accumulate_grad_batches`` (and DDP averages over
ranks), which is a mean of per-batch means: wrong for masked, variable-length sequences. Here,
as torchtune does, each micro-batch backpropagates its summed token NLL (times the factors
Lightning and DDP divide by) and counts its supervised tokens; at step time, before clipping and
the optimizer, the gradients are divided by a token count, so ``batch 1 x accumulate 4 == batch 4 x
accumulate 1``. Which count is ``token_weighting``:

- ``epoch`` (default): the epoch's mean supervised tokens per optimizer step, a constant. Every
  supervised token of the epoch weighs the same, whichever batch it falls in, as in a plain loop
  over random batches. Batches grouped by length (or packed) would otherwise give the tokens of a
  batch of short answers many times the weight of a long answer's; measured against
  transformers+PEFT, that cost validation NLL (``benchmarks/quality_parity.py``, README).
- ``window``: the supervised tokens of the step's own window, all ranks: each step is the mean over
  its tokens (torchtune's normalisation).

Checkpoints hold only the LoRA tensors plus optimizer, scheduler, RNG and a provenance record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict

import lightning as L
import torch
from torchmetrics import MeanMetric

from llm_lightning import nf4
from llm_lightning.errors import CheckpointError, UserFacingError
from llm_lightning.fsdp import FSDP2Strategy, is_sharded, shard_model
from llm_lightning.linear_cross_entropy import LogitsBuffer
from llm_lightning.lora import LoRAConfig, is_lora_parameter
from llm_lightning.lr_schedule import apply_current_rate, warmup_cosine
from llm_lightning.loss import TOKEN_WEIGHTINGS, model_nll
from llm_lightning.model import LLaMA
from llm_lightning.provenance import check_provenance

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class NonFiniteLossError(UserFacingError):
    """Training diverged; the last checkpoint written before this step is intact."""


class LoRAFineTuner(L.LightningModule):
    stage = "sft"  # recorded in checkpoints: what the tools that read them do with the adapter
    reports_perplexity = True  # the loss is a mean token NLL
    uses_lm_head = True  # the output head runs in every step (not in a reward model): counted in flops()

    def __init__(self, model: LLaMA, *, lora: LoRAConfig, optimizer: OptimizerFactory,
                 warmup_steps: int = 0, min_lr: float = 0.0, provenance: dict[str, str] | None = None,
                 force_adapter_load: bool = False, token_weighting: str = "epoch") -> None:
        super().__init__()
        self.model = model
        self.lora_config = lora
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr = warmup_steps, min_lr
        self.provenance = provenance or {}
        self.force_adapter_load = force_adapter_load
        if token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting={token_weighting}: expected one of {', '.join(TOKEN_WEIGHTINGS)}")
        self.token_weighting = token_weighting
        self._terms_per_step: float | None = None  # token_weighting=epoch: the constant, set at fit start
        # Checkpoints carry only LoRA tensors; on_load_checkpoint verifies that exactly those are present.
        self.strict_loading = False
        self.val_loss = MeanMetric()  # weighted by the loss's terms (tokens: exp() of it is the perplexity)
        self.flops_per_batch = 0
        self._matmul_parameters: int | None = None
        # Loss terms (supervised tokens) backpropagated since the last optimizer step, this rank: a
        # tensor, so that counting adds no host-device sync per micro-batch.
        self._window_count: torch.Tensor | int = 0
        #: The optimizer steps this fit plans, and those the checkpoint it resumed from planned.
        self.planned_steps: int | None = None
        self.resumed_planned_steps: int | None = None
        self.logits_buffer = LogitsBuffer()  # the fused head's chunk of logits, kept from step to step

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp``, shard the model (``fsdp.py``). Lightning calls this hook once the
        ranks exist, before every fit and validate, so it shards only once."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy) and not is_sharded(self.model):
            shard_model(self.model, strategy.world_size, strategy.root_device.type)

    def flops(self, batch_size: int, seq_len: int, *, backward: bool) -> int:
        """FLOPs of a batch, read by Lightning's ThroughputMonitor for MFU. Per token: forward 2N and,
        for LoRA on a frozen base, backward through activations only 2N more (no weight gradients
        for the base), plus attention 4·L·d·T forward (12·L·d·T with backward); N = matmul parameters."""
        if self._matmul_parameters is None:
            self._matmul_parameters = sum(nf4.numel(m.weight) for m in self.model.modules()
                                          if isinstance(m, torch.nn.Linear)
                                          and (self.uses_lm_head or m is not self.model.output))
            if self.model.output is None and self.uses_lm_head:
                self._matmul_parameters += self.model.tok_embeddings.weight.numel()
        config = self.model.config
        per_token = (4 if backward else 2) * self._matmul_parameters
        per_token += (12 if backward else 4) * config.n_layers * config.dim * seq_len
        return batch_size * seq_len * per_token

    @staticmethod
    def is_checkpointed(name: str) -> bool:
        """Whether a state-dict entry is trained, and so saved: the LoRA tensors (and a subclass's own head)."""
        return is_lora_parameter(name)

    def log_stage_metrics(self, stage: str, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Per step in training, per epoch in validation; accuracy on the progress bar."""
        for name, value in metrics.items():
            # Validation is split across ranks: the epoch's value is the batch-weighted mean over all of them.
            self.log(f"{stage}/{name}", value, on_step=stage == "train", on_epoch=stage != "train",
                     batch_size=batch_size, prog_bar=name.endswith("accuracy"), sync_dist=stage != "train")

    def loss_terms(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of terms summed) of a batch: here the NLL of its supervised tokens.
        A subclass with another objective (``dpo.py``: one term per preference pair) overrides this."""
        return model_nll(self.model, batch["input_ids"], batch["labels"], positions=batch.get("positions"),
                         document_ids=batch.get("document_ids"), logits_buffer=self.logits_buffer)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.flops_per_batch = self.flops(*batch["input_ids"].shape, backward=True)
        loss_sum, count = self.loss_terms(batch, "train")
        self._stop_if_not_finite(loss_sum, batch_idx)
        self._window_count = self._window_count + count.detach()
        mean_loss = loss_sum.detach() / count.clamp(min=1)
        self.log("train/loss", mean_loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if self.reports_perplexity:
            self.log("train/ppl", mean_loss.exp(), on_step=True, batch_size=batch["input_ids"].shape[0])
        # A sum over terms: Lightning's division by the accumulation and DDP's by the ranks are undone
        # here, and the division by a count happens at step time (optimizer_step).
        return loss_sum * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def _stop_if_not_finite(self, loss_sum: torch.Tensor, batch_idx: int) -> None:
        """Raise on every rank at once when any rank's loss is not finite, naming the first such
        rank: a rank that stopped alone would leave the others waiting in the next collective."""
        losses = loss_sum.detach().float().reshape(1)
        distributed = self.trainer.world_size > 1
        if distributed:
            losses = self.all_gather(losses).flatten()  # one per rank, the same on every rank
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            where = f" on rank {bad[0]}" if distributed else ""
            raise NonFiniteLossError(
                f"training loss became {losses[bad[0]].item()}{where} at step {self.global_step} (batch {batch_idx}); "
                "stopped before the update, the last checkpoint is intact; try a lower optimizer.lr"
            )

    def on_fit_start(self) -> None:
        if self.token_weighting == "epoch":
            per_batch = getattr(self.trainer.datamodule, "loss_terms_per_batch", None)
            if per_batch is None:
                raise UserFacingError("token_weighting=epoch needs a datamodule with loss_terms_per_batch "
                                      "(AlpacaDataModule has it); or use token_weighting=window")
            self._terms_per_step = per_batch * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step with the gradients divided by the token count ``token_weighting`` names: inside the
        closure, so that clipping, hooks and a grad scaler all see the normalised gradient."""

        def closure():
            result = optimizer_closure()
            if self._terms_per_step is not None:
                tokens = torch.tensor(self._terms_per_step, dtype=torch.float32, device=self.device)
            else:
                tokens = torch.as_tensor(self._window_count, dtype=torch.float32, device=self.device)
                if self.trainer.world_size > 1:
                    tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            self._window_count = 0
            for parameter in self.parameters():
                if parameter.grad is not None:
                    parameter.grad.div_(tokens.clamp(min=1))
            return result

        optimizer.step(closure=closure)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.flops_per_batch = self.flops(*batch["input_ids"].shape, backward=False)
        loss_sum, count = self.loss_terms(batch, "val")
        self.val_loss.update(loss_sum / count.clamp(min=1), weight=count)

    def on_validation_epoch_end(self) -> None:
        mean_loss = self.val_loss.compute()  # synchronised across ranks
        self.log("val/loss", mean_loss, prog_bar=True, sync_dist=False)
        if self.reports_perplexity:
            self.log("val/ppl", mean_loss.exp(), sync_dist=False)
        self.val_loss.reset()

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        self.planned_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, warmup_steps=self.warmup_steps, total_steps=self.planned_steps,
                                  min_lr=self.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: adapter only, with provenance and RNG state -------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_checkpointed(k)}
        broken = [k for k, v in checkpoint["state_dict"].items() if not torch.isfinite(v).all()]
        if broken:  # raising here keeps the previous (good) checkpoint file in place
            raise NonFiniteLossError(
                f"LoRA weights became non-finite at step {self.global_step} ({broken[0]}); "
                "not saving them, the last checkpoint is intact; try a lower optimizer.lr"
            )
        checkpoint["provenance"] = dict(self.provenance)
        checkpoint["stage"] = self.stage
        checkpoint["lora_config"] = {**asdict(self.lora_config), "targets": list(self.lora_config.targets)}
        if (dtype := nf4.base_dtype(self.model)) is not None:  # what the NF4 codes were quantized from
            checkpoint["base_quant_dtype"] = str(dtype).removeprefix("torch.")
        checkpoint["model_config"] = self.model.config.to_dict()
        checkpoint["planned_steps"] = self.planned_steps  # the budget its schedule was for
        checkpoint["rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()

    def on_train_start(self) -> None:
        resumed = self.resumed_planned_steps
        if resumed is None or resumed == self.planned_steps:
            return
        apply_current_rate(self.lr_schedulers())
        if self.trainer.is_global_zero:
            print(f"resumed at step {self.global_step} of a run planned for {resumed} optimizer steps: the "
                  f"learning rate now follows the schedule for {self.planned_steps} (lr_schedule.py)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        source = "checkpoint"
        check_provenance(checkpoint.get("provenance"), self.provenance, source=source, force=self.force_adapter_load)
        saved_quant = (checkpoint.get("lora_config") or {}).get("base_quant")
        if saved_quant != self.lora_config.base_quant:
            raise CheckpointError(f"{source}: trained with lora.base_quant={saved_quant or 'null'}, "
                                  f"resumed with {self.lora_config.base_quant or 'null'}; resume with the same setting")
        expected = {k for k in self.state_dict() if self.is_checkpointed(k)}
        present = set(checkpoint["state_dict"])
        if present != expected:
            raise CheckpointError(
                f"{source}: holds {len(present & expected)} of {len(expected)} trained tensors of this model "
                f"and {len(present - expected)} others; was it trained with a different lora.r/targets?"
            )
        self.resumed_planned_steps = checkpoint.get("planned_steps")
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_state"])
