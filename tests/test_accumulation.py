"""The gradient of one optimizer step is the mean over every supervised token of the window."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from llm_lightning.loading import embedded_tokenizer
from llm_lightning.data import AlpacaDataModule
from llm_lightning.lora import LoRAConfig
from llm_lightning.loss import token_nll
from llm_lightning.module import LoRAFineTuner
from tests.conftest import tiny_lora_model

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path


class GradientCapture(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


class MeanOfMeans(LoRAFineTuner):
    """What plain Lightning does: each micro-batch's own token mean, divided by the accumulation."""

    def training_step(self, batch, batch_idx):
        loss_sum, n_tokens = token_nll(self.model(batch["input_ids"]), batch["labels"])
        return loss_sum / n_tokens


def first_step_gradients(batch_size: int, accumulate: int, module_class=LoRAFineTuner, packing: bool = False):
    model = tiny_lora_model(vocab_size=49152)
    datamodule = AlpacaDataModule(tokenizer=embedded_tokenizer(), limit=5, val_size=1, batch_size=batch_size,
                                  max_seq_length=128, packing=packing)
    module = module_class(model.train(), lora=LoRAConfig(r=4, dropout=0.0),
                          optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    capture = GradientCapture()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[capture])
    trainer.fit(module, datamodule=datamodule)
    lengths = {len(e.input_ids) for e in datamodule.train_examples}
    return capture.grads, lengths


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_batch_1_accumulate_4_equals_batch_4():
    one_by_four, lengths = first_step_gradients(batch_size=1, accumulate=4)
    four_by_one, _ = first_step_gradients(batch_size=4, accumulate=1)
    two_by_two, _ = first_step_gradients(batch_size=2, accumulate=2)
    assert len(lengths) >= 3  # four examples of varying lengths
    assert max_difference(one_by_four, four_by_one) <= 1e-6
    assert max_difference(two_by_two, four_by_one) <= 1e-6


def test_mean_of_means_breaks_the_identity():
    """The same check is sensitive: Lightning's default weighting gives a different gradient."""
    ours, _ = first_step_gradients(batch_size=4, accumulate=1)
    naive, _ = first_step_gradients(batch_size=1, accumulate=4, module_class=MeanOfMeans)
    assert max_difference(ours, naive) > 1e-4


def test_packed_rows_give_the_gradient_of_the_same_examples_unpacked():
    """The four examples (47-53 tokens) pack two to a 128-token row."""
    packed, _ = first_step_gradients(batch_size=4, accumulate=1, packing=True)
    unpacked, _ = first_step_gradients(batch_size=4, accumulate=1)
    assert max_difference(packed, unpacked) <= 1e-6
