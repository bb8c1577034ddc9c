"""A loss or adapter that turns NaN stops training with its step, leaving the last good checkpoint."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.data import AlpacaDataModule
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.module import LoRAFineTuner, NonFiniteLossError


class PoisonAdapter(L.Callback):
    """Fault injection: the adapter diverges at a given step (as a too-high learning rate would make it)."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _poison(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.layers[0].attention.wq.lora_b.fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hook == "start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook == "end":
            self._poison(trainer, pl_module)


@pytest.mark.parametrize("hook, message", [("start", "training loss became nan at step 3"),
                                           ("end", "LoRA weights became non-finite at step 3")])
def test_divergence_stops_and_keeps_last_good_checkpoint(hook, message, tmp_path):
    torch.manual_seed(0)
    model = apply_lora(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=49152)), LoRAConfig(r=4)).train()
    module = LoRAFineTuner(model, lora=LoRAConfig(r=4), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    datamodule = AlpacaDataModule(tokenizer=embedded_tokenizer(), limit=40, val_size=4, max_seq_length=128)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[PoisonAdapter(3, hook), checkpoints])
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit(module, datamodule=datamodule)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 if hook == "start" else last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
