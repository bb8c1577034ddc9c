"""LoRA's CPU dropout: the rate, the scaling, independence across lanes, the saved mask, seeding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_lightning.dropout import Dropout, drop_count, dropout, effective_rate
from llm_lightning.lora import LoRAConfig, LoRALinear, apply_lora, lora_config_of
from llm_lightning.model import LLaMA, LLaMAConfig


def dropped_fraction_bound(p: float, n: int) -> float:
    """Six standard deviations of a binomial fraction: a correct mask fails this about once in 10^9."""
    return 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_drop_rate_is_p_rounded_to_a_multiple_of_1_over_65536(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 4001)  # numel not a multiple of the four lanes of a draw
    dropped = (dropout(x, p) == 0)
    assert effective_rate(p) == drop_count(p) / 65536 and abs(effective_rate(p) - p) <= 0.5 / 65536
    assert abs(dropped.float().mean().item() - effective_rate(p)) < dropped_fraction_bound(p, x.numel())
    # Every lane of a draw drops at that rate: element i takes lane i % 4.
    for lane in range(4):
        column = dropped.view(-1)[lane::4].float()
        assert abs(column.mean().item() - effective_rate(p)) < dropped_fraction_bound(p, column.numel())


def test_neighbouring_elements_are_dropped_independently():
    torch.manual_seed(1)
    p, x = 0.5, torch.ones(2_000_000)
    dropped = (dropout(x, p) == 0).float()
    for step in (1, 2, 3, 4):  # lanes of one draw (1-3), and the same lane of the next draw (4)
        both = (dropped[:-step] * dropped[step:]).mean().item()
        assert abs(both - 0.25) < dropped_fraction_bound(0.25, x.numel() - step)


def test_kept_values_are_scaled_so_that_the_expectation_is_the_input():
    torch.manual_seed(2)
    x = torch.randn(300, 77)
    y = dropout(x, 0.05)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - effective_rate(0.05)), rtol=1e-6, atol=0)


def test_the_gradient_is_the_mask_and_only_a_boolean_mask_is_saved():
    torch.manual_seed(3)
    x = torch.randn(64, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 0.1)
    y.backward(torch.ones_like(y))
    expected = (y != 0).float() / (1 - effective_rate(0.1))
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=0)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]


def test_the_masks_follow_torch_manual_seed():
    x = torch.randn(100, 100)
    torch.manual_seed(4)
    first = dropout(x, 0.2)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.2), first)
    assert not torch.equal(dropout(x, 0.2), first)


def test_outside_training_and_at_the_ends_of_the_range_it_is_exact():
    x = torch.randn(10, 10)
    assert torch.equal(dropout(x, 0.5, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(dropout(x, 1e-7), x)  # rounds to no drop at all, and so no rescaling either


def test_the_module_is_an_nn_dropout_that_lora_layers_use_and_report():
    module = Dropout(0.05)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.05
    assert torch.equal(module.eval()(torch.ones(3)), torch.ones(3))
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny"))
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.05, targets=("wq", "wv")))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(type(layer.lora_dropout) is Dropout for layer in layers)
    assert lora_config_of(model).dropout == 0.05


def test_under_compile_and_off_the_cpu_it_is_torch_dropout():
    """Where ``F.dropout`` draws its own numbers, the two agree call for call under the same seed."""
    x = torch.randn(50, 50, device="meta")
    assert dropout(x, 0.3).device.type == "meta"  # F.dropout's path: the CPU mask would fail here
    compiled = torch.compile(lambda t: dropout(t, 0.3), backend="eager")
    x = torch.randn(50, 50)
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, F.dropout(x, 0.3, True))
