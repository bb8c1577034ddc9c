"""Token weighting: accumulation is token-exact, and every supervised token of an epoch weighs the same."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from llm_lightning.loading import embedded_tokenizer
from llm_lightning.data import AlpacaDataModule
from llm_lightning.lora import LoRAConfig
from llm_lightning.loss import model_nll, token_nll
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


class StepGradients(L.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def fit_without_updates(*, batch_size: int, accumulate: int = 1, limit: int = 5, max_steps: int = -1,
                        module_class=LoRAFineTuner, packing: bool = False, token_weighting: str = "epoch"):
    """Train the tiny LoRA model with lr 0 (so every step sees the same weights); the gradient of
    every optimizer step, and the data module."""
    model = tiny_lora_model(vocab_size=49152)
    datamodule = AlpacaDataModule(tokenizer=embedded_tokenizer(), limit=limit, val_size=1, batch_size=batch_size,
                                  max_seq_length=128, packing=packing)
    module = module_class(model.train(), lora=LoRAConfig(r=4, dropout=0.0), token_weighting=token_weighting,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    capture = StepGradients()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[capture])
    trainer.fit(module, datamodule=datamodule)
    return capture.steps, datamodule


def first_step_gradients(batch_size: int, accumulate: int, module_class=LoRAFineTuner, packing: bool = False,
                         token_weighting: str = "epoch"):
    steps, datamodule = fit_without_updates(batch_size=batch_size, accumulate=accumulate, max_steps=1,
                                            module_class=module_class, packing=packing,
                                            token_weighting=token_weighting)
    return steps[0], {len(e.input_ids) for e in datamodule.train_examples}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("token_weighting", ["epoch", "window"])
def test_batch_1_accumulate_4_equals_batch_4(token_weighting):
    one_by_four, lengths = first_step_gradients(batch_size=1, accumulate=4, token_weighting=token_weighting)
    four_by_one, _ = first_step_gradients(batch_size=4, accumulate=1, token_weighting=token_weighting)
    two_by_two, _ = first_step_gradients(batch_size=2, accumulate=2, token_weighting=token_weighting)
    assert len(lengths) >= 3  # four examples of varying lengths
    assert max_difference(one_by_four, four_by_one) <= 1e-6
    assert max_difference(two_by_two, four_by_one) <= 1e-6


def test_mean_of_means_breaks_the_identity():
    """The same check is sensitive: Lightning's default weighting gives a different gradient."""
    ours, _ = first_step_gradients(batch_size=4, accumulate=1, token_weighting="window")
    naive, _ = first_step_gradients(batch_size=1, accumulate=4, module_class=MeanOfMeans, token_weighting="window")
    assert max_difference(ours, naive) > 1e-4


def test_packed_rows_give_the_gradient_of_the_same_examples_unpacked():
    """The four examples (47-53 tokens) pack two to a 128-token row."""
    packed, _ = first_step_gradients(batch_size=4, accumulate=1, packing=True, token_weighting="window")
    unpacked, _ = first_step_gradients(batch_size=4, accumulate=1, token_weighting="window")
    assert max_difference(packed, unpacked) <= 1e-6


def epoch_mean_gradient(datamodule) -> dict[str, torch.Tensor]:
    """The gradient of the mean NLL over every supervised token of the training set, one example at a time."""
    model = tiny_lora_model(vocab_size=49152).train()
    total, tokens = 0.0, 0
    for example in datamodule.train_examples:
        loss_sum, n_tokens = model_nll(model, torch.tensor([example.input_ids]), torch.tensor([example.labels]))
        loss_sum.backward()
        tokens += int(n_tokens)
    return {f"model.{n}": p.grad / tokens for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("token_weighting, same_weight", [("epoch", True), ("window", False)])
def test_every_supervised_token_of_the_epoch_weighs_the_same(token_weighting, same_weight):
    """Eight examples whose answers run from 8 to 51 tokens, grouped by length into four
    batches of two: with ``epoch`` weighting the four step gradients add up to four times the
    gradient of the epoch's mean token loss (a short batch's tokens weigh as much as a long
    batch's); with ``window`` weighting (each step its own mean) they do not."""
    steps, datamodule = fit_without_updates(batch_size=2, limit=9, token_weighting=token_weighting)
    supervised = sorted(e.supervised_tokens for e in datamodule.train_examples)
    assert len(steps) == 4 and supervised[-1] >= 5 * supervised[0]
    summed = {name: sum(step[name] for step in steps) for name in steps[0]}
    expected = {name: 4 * grad for name, grad in epoch_mean_gradient(datamodule).items()}
    scale = max(grad.abs().max().item() for grad in expected.values())
    assert (max_difference(summed, expected) <= 1e-5 * scale) is same_weight
