"""DPO: the loss and its gradient are the formula's, log 2 at initialisation, exact across accumulation."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.data import PreferenceDataModule
from llm_lightning.dpo import DPOFineTuner, reference_log_probs
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.preference_loss import DPOConfig
from tests.conftest import tiny_lora_model, write_preference_pairs

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path


def datamodule(tmp_path, count: int = 9, **kwargs) -> PreferenceDataModule:
    """``count`` pairs: one for validation, the rest for training."""
    data = PreferenceDataModule(str(write_preference_pairs(tmp_path / "pairs.json", count=count)),
                                tokenizer=embedded_tokenizer(), val_size=1, max_seq_length=128, **kwargs)
    data.setup("fit")
    return data


def module(model, config: DPOConfig = DPOConfig(), **kwargs) -> DPOFineTuner:
    return DPOFineTuner(model.train(), dpo=config, lora=LoRAConfig(r=4, dropout=0.0),
                        optimizer=functools.partial(torch.optim.SGD, lr=0.0), **kwargs)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, **kwargs)


def direct_log_probs(model, batch) -> torch.Tensor:
    """Each sequence's summed log-probability of its supervised tokens, from the full logits."""
    logits = model(batch["input_ids"])[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("config", [DPOConfig(beta=0.3, label_smoothing=0.1), DPOConfig(beta=0.3, loss_type="ipo"),
                                    DPOConfig(beta=0.3, loss_type="hinge")], ids=["sigmoid", "ipo", "hinge"])
def test_loss_and_gradient_equal_the_formula_on_the_same_log_probs(config, tmp_path):
    data = datamodule(tmp_path)
    batch = data._collate()(data.train_examples[:3])
    pairs = 3
    model = tiny_lora_model(vocab_size=49152)
    with torch.no_grad():  # a reference near the policy, so that every loss (the hinge too) has a gradient
        near, _ = direct_log_probs(model, batch)
    batch["reference_log_probs"] = near.double() + torch.tensor([0.5, -1.0, 2.0, -0.5, 1.0, 0.0], dtype=torch.float64)
    loss_sum, count = module(model, config).loss_terms(batch, "train")
    loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    policy, tokens = direct_log_probs(model, batch)
    reference = batch["reference_log_probs"].float()
    if config.loss_type == "ipo":
        policy, reference = policy / tokens, reference / tokens
    h = (policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:])
    eps, beta = config.label_smoothing, config.beta
    expected = {"sigmoid": -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h),
                "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": torch.clamp(1 - beta * h, min=0)}[config.loss_type].sum()
    expected.backward()
    assert int(count) == pairs
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    scale = max(grad.abs().max().item() for grad in ours.values())
    assert scale > 0
    for name, grad in ours.items():
        assert (grad - dict(model.named_parameters())[name].grad).abs().max().item() <= 1e-4 * scale, name


def test_the_loss_is_log_2_at_initialisation(tmp_path):
    """Adapter B = 0: the policy is the reference, so every pair's loss is log 2."""
    torch.manual_seed(0)
    model = apply_lora(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=49152)), LoRAConfig(r=4))
    data = datamodule(tmp_path, batch_size=2)
    data.val_examples = data.train_examples  # eight pairs to validate on
    result = trainer().validate(module(model), datamodule=data, verbose=False)[0]
    assert result["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["val/rewards/margin"] == pytest.approx(0.0, abs=1e-5)


class StepGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_step_gradients(tmp_path, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    capture = StepGradients()
    trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[capture]).fit(
        module(tiny_lora_model(vocab_size=49152)), datamodule=datamodule(tmp_path, count=5, batch_size=batch_size))
    return capture.grads


def test_batch_1_accumulate_4_equals_batch_4_pairs(tmp_path):
    one_by_four = first_step_gradients(tmp_path, batch_size=1, accumulate=4)
    four_by_one = first_step_gradients(tmp_path, batch_size=4, accumulate=1)
    assert one_by_four.keys() == four_by_one.keys() and one_by_four
    for name in one_by_four:
        torch.testing.assert_close(one_by_four[name], four_by_one[name], rtol=1e-5, atol=1e-7)


def test_reference_log_probs_do_not_depend_on_the_batch(tmp_path):
    data = datamodule(tmp_path)
    model = tiny_lora_model(vocab_size=49152).eval()
    with torch.no_grad():
        alone = reference_log_probs(model, data.train_examples, data.tokenizer.pad_id, batch_size=1)
        together = reference_log_probs(model, data.train_examples, data.tokenizer.pad_id, batch_size=8)
    for a, b in zip(alone, together):
        assert a.reference == pytest.approx(b.reference, rel=1e-5)
