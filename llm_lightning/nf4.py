"""A 4-bit NormalFloat (NF4) frozen base for QLoRA: ``lora.base_quant=nf4``.

QLoRA's storage, exactly: each block of 64 weights is 4-bit codes into the 16 NF4 levels times
the block's absmax, and those absmax scales are themselves quantized to 8 bits in blocks of 256
("double quantization"): 0.516 bytes a weight against 2 for bf16. Every linear layer inside the
blocks is stored so; embeddings, norms and the head stay as they were. A layer dequantizes its
weight to the activations' dtype for each product and keeps only the 4-bit codes for backward
(``_NF4Product``), so the dense weight never outlives one matrix product.

The codes and their dequantization are bitsandbytes' (the library PEFT and transformers use for
QLoRA), through its public ``quantize_4bit``/``dequantize_4bit``; the weight is its ``Params4bit``,
which carries its quantization state across ``.to(device)``. Measured on a 2-core Sapphire Rapids
Xeon (``benchmarks/nf4_kernels.py``, torchao 0.18 installed beside it): dequantizing a 4096x4096
matrix takes 21-29 ms with bitsandbytes' CPU kernel against 200-215 ms with torchao's ``NF4Tensor``
(plain PyTorch ops, no CPU kernel), whose double quantization also refuses matrices whose block
count is not a multiple of 256 (SmolLM2's 576x576 projections). bitsandbytes picks AVX-512 or a
plain AVX path at run time. bitsandbytes is an optional extra (``pip install -e ".[qlora]"``,
125 MB installed).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning.errors import SettingError

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA)
SCALE_BLOCK_SIZE = 256  # absmax scales per second-level scale (bitsandbytes' fixed value)
QUANTIZED_LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
BASE_QUANTS = ("nf4",)
INSTALL_HINT = 'pip install -e ".[qlora]" (bitsandbytes)'


def bytes_per_weight() -> float:
    """Storage of one NF4 weight: half a byte of code, an int8 scale per block, an fp32 one per 256 blocks."""
    return 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SCALE_BLOCK_SIZE)


def require() -> None:
    """One error line when bitsandbytes is missing (train.py calls it before loading any weights)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SettingError(f"lora.base_quant=nf4 needs bitsandbytes: {INSTALL_HINT}")


def _bitsandbytes() -> Any:
    require()
    # Its CPU backend warns at import about an optional kernel package for a fused product we do
    # not use (we dequantize and let PyTorch multiply); that logger only.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def is_nf4(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None and getattr(weight, "quant_type", None) == "nf4"


def quantize(weight: torch.Tensor) -> nn.Parameter:
    """``weight`` as a frozen NF4 parameter (``Params4bit``) on the same device, dequantizing to its dtype."""
    bnb = _bitsandbytes()
    codes, state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCK_SIZE,
                                                compress_statistics=True, quant_type="nf4")
    state.dtype = weight.dtype  # what dequantize() returns by default
    return bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=BLOCK_SIZE,
                             compress_statistics=True, quant_type="nf4", bnb_quantized=True)


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense matrix an NF4 weight stands for (any other tensor is returned as it is)."""
    if not is_nf4(weight):
        return weight if dtype is None else weight.to(dtype)
    dense = _bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)
    return dense if dtype is None else dense.to(dtype)


def logical_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a tensor's values are in (an NF4 one dequantizes to the dtype it was quantized from)."""
    return weight.quant_state.dtype if is_nf4(weight) else weight.dtype


def numel(weight: torch.Tensor) -> int:
    """The number of weights a tensor stands for (an NF4 one packs two per byte)."""
    return weight.quant_state.shape.numel() if is_nf4(weight) else weight.numel()


class _NF4Product(torch.autograd.Function):
    """x W^T with W dequantized for the product, in forward and again in backward: autograd keeps
    the 4-bit codes, not the dense matrix (which would cost the memory QLoRA saves). The base is
    frozen, so only the input's gradient is computed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantize(ctx.weight, grad.dtype), None


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    out = _NF4Product.apply(x, weight) if torch.is_grad_enabled() and x.requires_grad else \
        F.linear(x, dequantize(weight, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers ``quantize_base`` stores in NF4: every linear layer inside the blocks."""
    return [(name, module) for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in QUANTIZED_LAYERS and isinstance(module, nn.Linear)]


def quantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Store every linear layer inside the blocks as NF4, in place; returns the model. Run before
    LoRA is added (``apply_lora`` does): the adapted layers share the quantized weight.

    ``dtype``: quantize the weights rounded to it (and dequantize to it), as they were in training:
    the same codes whatever dtype the base was loaded in here (``base_dtype`` records it)."""
    for name, module in quantized_layers(model):
        if is_nf4(module.weight):
            continue
        if module.bias is not None:
            raise ValueError(f"{name}: NF4 layers have no bias; LLaMA linear layers have none")
        if module.weight.device.type == "meta":
            raise ValueError(f"{name}: cannot quantize a weight on the meta device")
        module.weight = quantize(module.weight if dtype is None else module.weight.to(dtype))
    return model


def base_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the NF4 weights were quantized from (None for a dense base)."""
    return next((logical_dtype(m.weight) for _, m in quantized_layers(model) if is_nf4(m.weight)), None)


@torch.no_grad()
def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo ``quantize_base`` in place: dense weights holding the values the NF4 codes stand for.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and is_nf4(module.weight):
            module.weight = nn.Parameter(dequantize(module.weight), requires_grad=False)
    return model
