"""``rms_norm``'s hand-written backward and its sampling path equal the definition differentiated by autograd."""

import pytest
import torch

from llm_lightning.rms_norm import reference_rms_norm, rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_gradients_equal_autograds_of_the_definition(dtype, weight_trains):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 64) * 3).to(dtype)
    weight = (torch.randn(64) * 0.2 + 1).to(dtype)
    grad = torch.randn(3, 7, 64).to(dtype)
    results = []
    for norm in (rms_norm, reference_rms_norm):
        x_leaf, weight_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        y = norm(x_leaf, weight_leaf, 1e-5)
        y.backward(grad)
        results.append((y.detach(), x_leaf.grad, weight_leaf.grad))
    (y, grad_x, grad_weight), (y_ref, grad_x_ref, grad_weight_ref) = results
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(grad_x, grad_x_ref, **tolerance)
    assert grad_x.dtype == dtype
    if weight_trains:
        torch.testing.assert_close(grad_weight, grad_weight_ref, **tolerance)
    else:
        assert grad_weight is None and grad_weight_ref is None


def test_rms_norm_without_gradients_equals_the_definition():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 64) * 3, torch.randn(64)
    x[1, :2] *= 1e-4  # rows where eps dominates mean(x^2), and one of zeros
    x[1, 2] = 0
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6), atol=1e-6, rtol=1e-6)
        bf16 = x.bfloat16()
        assert torch.equal(rms_norm(bf16, weight.bfloat16(), 1e-6), reference_rms_norm(bf16, weight.bfloat16(), 1e-6))


def test_rms_norm_stays_fp32_under_autocast():
    """bf16-mixed training runs the norm under autocast: its sums must not drop to bf16."""
    torch.manual_seed(0)
    x, weight, grad = torch.randn(2, 5, 64) * 3, torch.randn(64) * 0.2 + 1, torch.randn(2, 5, 64)
    results = []
    for norm in (rms_norm, reference_rms_norm):
        x_leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x_leaf, weight, 1e-5)
        y.backward(grad)
        results.append((y.detach(), x_leaf.grad))
    assert results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
