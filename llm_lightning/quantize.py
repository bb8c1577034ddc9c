"""Sampling-only rewrites of the linear layers: weight-only int8, and oneDNN-packed weights.

Batch-1 decoding reads every weight once per token, so its speed is the speed of matrix-vector
products, bound by memory. Weight-only int8 reads a quarter of fp32's bytes: ``quantize_int8`` replaces every linear layer (and the output head,
also when it is tied to the embeddings) by ``Int8Linear``: one int8 row per output and one scale
per row (symmetric, absmax / 127), multiplied by PyTorch's own int8 weight kernel on CPU where
``cpu_kernels`` found it working (bf16 activations: 4-7x the fp32 product's speed on a Zen 5 EPYC,
1.5x on a Sapphire Rapids Xeon, on SmolLM2's shapes); the rest of the model keeps its dtype, and so
does the embedding lookup.

For sampling only: run it after an adapter is loaded (LoRA layers are merged first); the
result cannot train, export or switch its adapter off. torchao offers the same quantisation
through tensor subclasses, which are slow in eager mode without ``torch.compile``.

``pack_weights`` keeps the weights' values and dtype and only changes their memory layout
(``linear.PackedLinear``), so it is exact; whether it pays depends on the CPU (``cpu_kernels``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning import cpu_kernels
from llm_lightning.linear import PackedLinear
from llm_lightning.lora import LoRALinear
from llm_lightning.model import LLaMA


class Int8Linear(nn.Module):
    """y = x (q * scale)^T, with q int8 [out, in] and scale [out] in the activations' dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scale = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and cpu_kernels.decision("int8_matmul"):
            # The CPU kernel is fast with bf16 activations only (with fp32 ones it is 4-6x slower,
            # measured on AVX-512 and AVX2), so fp32 inputs are rounded to bf16 for the product, as autocast would.
            compute = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
            out = cpu_kernels.int8_linear(flat.to(compute), self.weight_int8, self.scale.to(compute))
        else:  # correct everywhere, fast only where an int8 kernel exists
            out = F.linear(flat, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@torch.no_grad()
def replace_linear_layers(model: LLaMA, make: Callable[[torch.Tensor], nn.Module]) -> LLaMA:
    """Replace every linear layer and the output head by ``make(weight)``, in place, for sampling only.

    LoRA layers are merged first; a tied head gets its own copy and the lookup keeps the table."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if isinstance(child, LoRALinear):
                    child.merge()
                if child.bias is not None:
                    raise ValueError(f"{name}: sampling layers have no bias; LLaMA linear layers have none")
                setattr(module, name, make(child.weight))
    if model.output is None:
        model.output = make(model.tok_embeddings.weight)
    return model


def quantize_int8(model: LLaMA) -> LLaMA:
    """Replace every linear layer and the output head by ``Int8Linear``, in place; returns the model."""
    return replace_linear_layers(model, Int8Linear)


def can_pack_weights(model: LLaMA) -> bool:
    """Whether oneDNN-packed weights work and pay for this CPU model's dtype (``cpu_kernels`` measures it)."""
    weight = model.tok_embeddings.weight
    return weight.device.type == "cpu" and cpu_kernels.packs(weight.dtype)


def pack_weights(model: LLaMA) -> LLaMA:
    """Replace every linear layer and the output head by ``PackedLinear``, in place; the same
    products from another layout (1.5x faster bf16 decoding on a Zen 5). Check ``can_pack_weights`` first."""
    return replace_linear_layers(model, PackedLinear)
