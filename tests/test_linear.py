"""linear.py: the oneDNN route for fp32 CPU products gives F.linear's values and gradients, and
the layers take it exactly when ``cpu_kernels`` decided so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_lightning import cpu_kernels
from llm_lightning.linear import Linear, _OneDNNLinear, linear, matmul_transposed

pytestmark = pytest.mark.kernels
needs_onednn = pytest.mark.skipif(not cpu_kernels.onednn_supported(torch.float32),
                                  reason="oneDNN fp32 products are not on this CPU or build (cpu_kernels says so)")


def forward_and_gradients(fn, x, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 64)])
@pytest.mark.parametrize("trainable_weight", [False, True])
def test_onednn_values_and_gradients_match_f_linear(shape, trainable_weight):
    """The autograd function itself, whatever this machine's speed decision."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(48, 64, requires_grad=trainable_weight)
    bias = torch.randn(48, requires_grad=trainable_weight)
    grad_out = torch.randn(*shape[:-1], 48)
    ours = forward_and_gradients(_OneDNNLinear.apply, x, weight, bias, grad_out)
    reference = forward_and_gradients(F.linear, x, weight, bias, grad_out)
    assert len(ours) == len(reference) == (4 if trainable_weight else 2)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 300])
def test_linear_matches_f_linear_on_the_chosen_path(rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 64)
    weight = torch.randn(40, 64)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    grad = torch.randn(rows, 40)
    torch.testing.assert_close(matmul_transposed(grad, weight.t()), grad @ weight, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_transposed_and_strided_operands():
    torch.manual_seed(0)
    x = torch.randn(64, 9).t()  # a non-contiguous input
    weight = torch.randn(40, 64)
    torch.testing.assert_close(cpu_kernels.onednn_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    grad = torch.randn(9, 40)
    torch.testing.assert_close(cpu_kernels.onednn_linear(grad, weight.t()), grad @ weight, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_autocast_take_f_linear():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(4, 32, dtype=dtype)
        assert not cpu_kernels.uses_onednn(x, weight.to(dtype))
        assert torch.equal(linear(x, weight.to(dtype)), F.linear(x, weight.to(dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(torch.randn(4, 32), weight).dtype == torch.bfloat16


def test_linear_module_keeps_nn_linear_names():
    layer = Linear(8, 4, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
