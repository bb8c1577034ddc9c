"""Sampling-only rewrites of the linear layers: weight-only int8 or int4, and oneDNN-packed weights.

Batch-1 decoding reads every weight once per token, so its speed is the speed of matrix-vector
products, bound by memory. Weight-only int8 reads a quarter of fp32's bytes: ``quantize_int8`` replaces every linear layer (and the output head,
also when it is tied to the embeddings) by ``Int8Linear``: one int8 row per output and one scale
per row (symmetric, absmax / 127), multiplied by PyTorch's own int8 weight kernel on CPU where
``cpu_kernels`` found it working (bf16 activations: 4-7x the fp32 product's speed on a Zen 5 EPYC,
1.5x on a Sapphire Rapids Xeon, on SmolLM2's shapes); the rest of the model keeps its dtype, and so
does the embedding lookup.

``quantize_int4`` stores each base matrix as 4-bit codes with a scale and a zero per group of 32
inputs (``Int4Linear``): the layout of llama.cpp's Q4_1, so a matrix read from a Q4_1 GGUF file
(the embedded model's) gets back its own codes and loses only the rounding of its scales to bf16;
the head and any layer an adapter was merged into get ``Int8Linear``, which keeps the update.

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

from llm_lightning import cpu_kernels, nf4
from llm_lightning.fused_projections import projection_groups
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


def int4_codes(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0-15 [out, in], scale [out, in / group], low [out, in / group]) with
    weight ~ codes * scale + low per group: llama.cpp's Q4_1 rule (low = min, scale = (max - min) / 15)."""
    groups = weight.detach().float().view(weight.shape[0], -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).view(weight.shape)
    return codes, scale, low


class Int4Linear(nn.Module):
    """y = x W^T with W[o, i] = (code[o, i] - 8) * scale[o, g] + zero[o, g], g = i // group_size:
    asymmetric 4-bit codes from each group's min and max (so the min and max are exact)."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        codes, scale, low = int4_codes(weight, group_size)
        # [in / group, out, 2] in bf16, as the kernel takes them; zero is the value of code 8.
        self.register_buffer("scale_and_zero", torch.stack([scale, low + 8 * scale], dim=-1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.kernel = weight.device.type == "cpu" and bool(cpu_kernels.decision("int4_matmul"))
        self.register_buffer("codes", cpu_kernels.pack_int4(codes) if self.kernel else codes.to(torch.uint8))

    @staticmethod
    def fits(weight: torch.Tensor, group_size: int = 32) -> bool:
        """Shapes the kernel takes: whole groups of inputs, outputs in blocks of 16."""
        return weight.shape[1] % group_size == 0 and weight.shape[0] % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel:  # bf16 activations, as for int8: the kernel is 20x slower with fp32 ones
            out = cpu_kernels.int4_linear(flat.to(torch.bfloat16), self.codes, self.group_size, self.scale_and_zero)
        else:  # correct everywhere, fast only where the kernel exists
            out = F.linear(flat, self.dequantized().to(x.dtype))
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        if self.kernel:  # the kernel's own answer for an identity input
            return cpu_kernels.int4_linear(torch.eye(self.in_features, dtype=torch.bfloat16), self.codes,
                                           self.group_size, self.scale_and_zero).float().t()
        scale, zero = self.scale_and_zero.float().transpose(0, 1).unbind(-1)
        groups = (self.codes.float().view(self.out_features, -1, self.group_size) - 8) * scale[..., None]
        return (groups + zero[..., None]).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


@torch.no_grad()
def replace_linear_layers(model: LLaMA, make: Callable[[torch.Tensor], nn.Module],
                          make_adapted: Callable[[torch.Tensor], nn.Module] | None = None,
                          make_head: Callable[[torch.Tensor], nn.Module] | None = None) -> LLaMA:
    """Replace every linear layer and the output head by ``make(weight)``, in place, for sampling only.

    LoRA layers are merged first and go to ``make_adapted`` (default ``make``); NF4 weights (a
    QLoRA base) are dequantized to the values they stand for; the head goes to
    ``make_head`` (default ``make``), a tied one gets its own copy and the lookup keeps the table.

    The projections that read the same input (q/k/v, and w1/w3: ``projection_groups``) become one
    layer made from their stacked weights, when one factory makes all of them: each output row is
    computed as it would be alone, and a decoded token makes 4 calls per block instead of 7. On a
    2-core Zen 3 EPYC, where the int4 products are under half of a token's time, a token of
    SmolLM2-135M took 36 ms instead of 41 (median of 14 alternating rounds). The stacked layer is
    the block's ``fused_qkv`` or ``fused_w13``; the layers' own names then hold None."""
    def factory(child: nn.Module) -> Callable[[torch.Tensor], nn.Module]:
        if child is model.output:
            return make_head or make
        return (make_adapted or make) if isinstance(child, LoRALinear) else make

    def sampling_weight(name: str, child: nn.Linear) -> torch.Tensor:
        if child.bias is not None:
            raise ValueError(f"{name}: sampling layers have no bias; LLaMA linear layers have none")
        if isinstance(child, LoRALinear):
            child.merge()
        return nf4.dequantize(child.weight)

    for owner, attribute, names in projection_groups(model):
        layers = [getattr(owner, name) for name in names]
        makers = {factory(layer) for layer in layers}
        if getattr(owner, attribute) is None and all(isinstance(m, nn.Linear) for m in layers) and len(makers) == 1:
            setattr(owner, attribute, makers.pop()(torch.cat([sampling_weight(n, m) for n, m in zip(names, layers)])))
            for name in names:
                setattr(owner, name, None)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, factory(child)(sampling_weight(name, child)))
    if model.output is None:
        model.output = (make_head or make)(model.tok_embeddings.weight)
    return model


def quantize_int8(model: LLaMA) -> LLaMA:
    """Replace every linear layer and the output head by ``Int8Linear``, in place; returns the model."""
    return replace_linear_layers(model, Int8Linear)


@torch.no_grad()
def holds_int4_codes(model: LLaMA, group_size: int = 32) -> bool:
    """Whether every base matrix is exactly 4-bit codes with a scale and minimum per group (as
    loaded from a Q4_1 GGUF file): then ``quantize_int4`` stores what the file held, not less."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and module is not model.output:
            weight = module.weight
            if nf4.is_nf4(weight) or not Int4Linear.fits(weight, group_size):
                return False
            codes, scale, low = int4_codes(weight, group_size)
            rebuilt = (codes.view(weight.shape[0], -1, group_size) * scale[..., None] + low[..., None]).view(weight.shape)
            if (rebuilt - weight.float()).abs().max() > 1e-5 * weight.abs().max():
                return False
    return True


def quantize_int4(model: LLaMA) -> LLaMA:
    """Base matrices to ``Int4Linear`` (group 32), the head and adapted layers to ``Int8Linear``, in place."""
    return replace_linear_layers(model, lambda w: Int4Linear(w) if Int4Linear.fits(w) else Int8Linear(w),
                                 make_adapted=Int8Linear, make_head=Int8Linear)


def can_pack_weights(model: LLaMA) -> bool:
    """Whether oneDNN-packed weights work and pay for this CPU model's dtype (``cpu_kernels`` measures it)."""
    weight = model.tok_embeddings.weight
    return weight.device.type == "cpu" and cpu_kernels.packs(weight.dtype)


def pack_weights(model: LLaMA) -> LLaMA:
    """Replace every linear layer and the output head by ``PackedLinear``, in place; the same
    products from another layout (1.5x faster bf16 decoding on a Zen 5). Check ``can_pack_weights`` first."""
    return replace_linear_layers(model, PackedLinear)
