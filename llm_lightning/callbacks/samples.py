"""Show what the model says, not only its loss: greedy answers to a few validation prompts after
every validation, as a wandb table when wandb logs the run, and printed otherwise.

Rank 0 logs and prints. Under FSDP every rank generates too: each forward gathers the shards of
every rank, so a rank that stayed out would leave the others waiting. The ranks hold the same
prompts and weights, so they compute the same tokens and stop at the same step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from llm_lightning.fsdp import FSDP2Strategy
from llm_lightning.generation import generate


class SampleGenerations(L.Callback):
    def __init__(self, num_prompts: int = 3, max_new_tokens: int = 64) -> None:
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens
        self.history: list[tuple[int, str, str, str]] = []  # (step, prompt, answer, reference)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (trainer.is_global_zero or isinstance(trainer.strategy, FSDP2Strategy)):
            return
        datamodule = trainer.datamodule
        records = getattr(datamodule, "val_records", [])[: self.num_prompts]
        if not records or trainer.sanity_checking or self.num_prompts <= 0:
            return
        template = datamodule.template
        prompts = [template.prompt(r.prompt, r.tools) for r in records]
        answers = generate(pl_module.model, datamodule.tokenizer, prompts, max_new_tokens=self.max_new_tokens)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        rows = [(step, r.title, a, r.reference) for r, a in zip(records, answers)]
        self.history.extend(rows)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            wandb_logger.log_table("val/samples", columns=["step", "prompt", "answer", "reference"],
                                   data=[list(row) for row in self.history], step=step)
        else:
            for _, prompt, answer, _ in rows:
                print(f"[step {step}] {prompt.splitlines()[0][:80]}\n  -> {answer[:200]}")
