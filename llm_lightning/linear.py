"""Linear layers whose fp32 matrix products run through oneDNN on x86 CPUs.

PyTorch multiplies fp32 matrices on CPU with MKL. On this project's 2-core AMD EPYC (AVX-512)
MKL reaches 185 GFLOP/s, about what 256-bit (AVX2) code can do, the path MKL is known to choose
on non-Intel CPUs; oneDNN, which PyTorch also ships and already uses for bf16, reaches 380-430
GFLOP/s on the same shapes, in fp32 and with fp32 rounding errors. On Intel CPUs the gap should
be small (not measured here). ``linear`` sends fp32 CPU products to oneDNN (through the operator
Inductor itself uses for CPU linear layers), forward and backward, and everything else to
``F.linear``.

``Linear`` is an ``nn.Linear`` with that forward, so parameter names, initialisation and
checkpoints are unchanged. Under ``torch.compile`` and CPU autocast it is plain ``F.linear``,
which the compiler and autocast know how to handle.

``PackedLinear`` goes one step further for sampling: oneDNN reorders the weight once into its
blocked layout, which matters for bf16 matrix-vector products (decoding one token): 37-42 GB/s
of weights read against 13-16 GB/s for the plain layout, measured on SmolLM2's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return True


ONEDNN_FP32 = _onednn_linear_available()


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN; weight may be a transposed view, which it reads in place."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN: plain fp32 CPU tensors, outside compile and autocast."""
    return (ONEDNN_FP32 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The input is kept only when the weight needs its gradient: a frozen base layer saves nothing.
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _product(x.contiguous(), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t())
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_weight = _product(rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with fp32 CPU products through oneDNN (see the module docstring)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x.contiguous(), weight, bias)  # sampling: spares autograd's per-call cost


def matmul_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without autograd, for code that computes its own gradients."""
    return _product(x.contiguous(), weight) if uses_onednn(x, weight) else x @ weight.t()


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PackedLinear(nn.Module):
    """A frozen linear layer, weight reordered by oneDNN for CPU sampling (fp32 or bf16, no bias).

    The packed weight is an opaque oneDNN tensor: it cannot be trained, saved or moved, so this
    only replaces layers of a model that will only sample (see ``quantize.pack_weights``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(x.contiguous(), self.packed_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"
