"""Linear layers whose fp32 CPU matrix products run through the kernel measured fastest.

``linear`` is ``F.linear``, except that plain fp32 CPU products go to the kernel that
``cpu_kernels.linear_function`` measured fastest on this machine for that shape class: oneDNN
instead of MKL (forward and backward) was 2x faster on a Zen 5 EPYC and no faster on a Sapphire
Rapids Xeon; for one-row products (decoding), oneDNN or MKL split over the threads, per weight shape.

``Linear`` is an ``nn.Linear`` with that forward, so parameter names, initialisation and
checkpoints are unchanged; its weight may be an NF4 one (``nf4.py``). Under ``torch.compile`` and CPU autocast it is plain ``F.linear``,
which the compiler and autocast know how to handle.

``PackedLinear`` goes one step further for sampling: oneDNN reorders the weight once into its
blocked layout, which on some CPUs speeds up bf16 matrix-vector products (decoding one token):
37-42 GB/s of weights read against 13-16 GB/s for the plain layout on a Zen 5 EPYC.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_lightning import nf4
from llm_lightning.cpu_kernels import linear_function, onednn_linear, pack


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The input is kept only when the weight needs its gradient: a frozen base layer saves nothing.
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t())
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_weight = onednn_linear(rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with fp32 CPU products through the fastest kernel (see the module docstring), and NF4
    weights (QLoRA's base, ``nf4.py``) dequantized for the product."""
    if nf4.is_nf4(weight):
        return nf4.nf4_linear(x, weight, bias)
    kernel = linear_function(x, weight)
    if (kernel is onednn_linear and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return _OneDNNLinear.apply(x, weight, bias)
    return kernel(x, weight, bias)  # oneDNN while sampling: spares autograd's per-call cost


def matmul_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without autograd, for code that computes its own gradients."""
    return linear_function(x, weight)(x, weight)


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
        self.packed_weight = pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.packed_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"
