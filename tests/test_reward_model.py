"""The reward model: Bradley-Terry loss and gradient, the score read at the last real token, log 2
at initialisation, exact across accumulation."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm_lightning.data import PreferenceDataModule
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import LoRAConfig
from llm_lightning.module import LoRAFineTuner
from llm_lightning.reward_model import HEAD_KEY, RewardModelFineTuner, last_token_index
from tests.conftest import tiny_lora_model, write_preference_pairs
from tests.test_dpo import StepGradients, trainer

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path


def datamodule(tmp_path, count: int = 9, margins: bool = False, **kwargs) -> PreferenceDataModule:
    """``count`` pairs, one held out; with ``margins``, record i carries margin i / 4."""
    path = write_preference_pairs(tmp_path / "pairs.json", count=count)
    if margins:
        records = json.loads(path.read_text())
        path.write_text(json.dumps([{**r, "margin": i / 4} for i, r in enumerate(records)]))
    data = PreferenceDataModule(str(path), tokenizer=embedded_tokenizer(), val_size=1, max_seq_length=128, **kwargs)
    data.setup("fit")
    return data


def module(model, **kwargs) -> RewardModelFineTuner:
    return RewardModelFineTuner(model.train(), pad_id=embedded_tokenizer().pad_id, lora=LoRAConfig(r=4, dropout=0.0),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.0), **kwargs)


def test_the_score_is_read_at_the_last_token_that_is_not_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [5, 0, 7, 0, 0]])
    assert last_token_index(ids, pad_id=0).tolist() == [2, 4, 0, 2]


def test_loss_and_gradient_equal_the_bradley_terry_formula(tmp_path):
    """Each sequence scored alone, unpadded, at its last token: the batched loss and gradient match."""
    data = datamodule(tmp_path, margins=True)
    pairs = data.train_examples[:3]
    batch = data._collate()(pairs)
    model = tiny_lora_model(vocab_size=49152)
    rm = module(model)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    loss_sum, count = rm.loss_terms(batch, "train")
    loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    assert HEAD_KEY in ours and any("lora_a" in n for n in ours)

    rm.zero_grad()
    def reward(example):
        hidden = model.hidden_states(torch.tensor([example.input_ids]))
        return rm.score(hidden[0, -1].float())[0]
    chosen = torch.stack([reward(p.chosen) for p in pairs])
    rejected = torch.stack([reward(p.rejected) for p in pairs])
    margins = torch.tensor([p.margin for p in pairs])
    assert len(set(margins.tolist())) == 3  # the records' own margins (i / 4), after the seeded split
    expected = -F.logsigmoid(chosen - rejected - margins).sum()
    expected.backward()
    assert int(count) == 3
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    scale = max(grad.abs().max().item() for grad in ours.values())
    for name, grad in ours.items():
        assert (grad - dict(rm.named_parameters())[name].grad).abs().max().item() <= 1e-4 * scale, name


def test_the_loss_is_log_2_at_initialisation(tmp_path):
    """The head starts at zero: every reward is 0, every pair's loss log 2."""
    data = datamodule(tmp_path, batch_size=2)
    data.val_examples = data.train_examples
    result = trainer().validate(module(tiny_lora_model(vocab_size=49152)), datamodule=data, verbose=False)[0]
    assert result["val/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert result["val/rewards/margin"] == 0.0


def first_step_gradients(tmp_path, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    capture = StepGradients()
    # In float64: in float32, padding's different summation order alone moves gradients by ~1e-5.
    rm = module(tiny_lora_model(vocab_size=49152).double())
    with torch.no_grad():
        rm.score.double().weight.normal_(0, 0.5)  # a nonzero head, so that LoRA has gradients too
    trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[capture]).fit(
        rm, datamodule=datamodule(tmp_path, count=5, margins=True, batch_size=batch_size))
    return capture.grads


def test_batch_1_accumulate_4_equals_batch_4_pairs(tmp_path):
    one_by_four = first_step_gradients(tmp_path, batch_size=1, accumulate=4)
    four_by_one = first_step_gradients(tmp_path, batch_size=4, accumulate=1)
    assert HEAD_KEY in one_by_four and one_by_four.keys() == four_by_one.keys()
    for name in one_by_four:
        torch.testing.assert_close(one_by_four[name], four_by_one[name], rtol=1e-10, atol=1e-12)


def test_flops_leave_out_the_language_model_head_a_reward_model_never_runs():
    model = tiny_lora_model(vocab_size=49152)
    supervised = LoRAFineTuner(model, lora=LoRAConfig(r=4), optimizer=torch.optim.SGD)
    head = model.config.vocab_size * model.config.dim
    for backward, factor in ((True, 4), (False, 2)):
        assert supervised.flops(2, 16, backward=backward) - module(model).flops(2, 16, backward=backward) == (
            2 * 16 * factor * head)
