"""Sampling with the projections that read the same input done as one product per group.

Decoding a token multiplies one row by every weight, so its speed is that of matrix-vector
products, and small ones run far below the memory rate: on a 2-core Zen 4, oneDNN read a
576 x 576 fp32 weight at 8-11 GB/s and a 3,072 x 576 one at 16-18 GB/s (MKL 8 GB/s at either
size), against 29 GB/s for a plain sum over memory. Attention's q, k and v projections read the same
normalised input, as do the feed-forward's gate (w1) and up (w3) projections, so each group can
be one product over the group's stacked weights: seven products per layer become four, and
greedy decoding of SmolLM2-135M in fp32 gets about 1.13x faster there.

The stacked weight is built when sampling starts, and the layers' own weights become row views
of it (their ``.data`` is pointed there), so memory does not grow; when sampling ends each
weight gets its own storage back, so training, saving and loading see the model as it was. Only
plain ``Linear`` layers without bias, on ordinary tensors of one dtype and device, take part, and
LoRA layers whose adapter is merged into the weight (as ``generate.py`` samples) or switched off
(the base side of ``compare=true``): active adapters, NF4 and FSDP-sharded layers keep their own
products, and a quantized or packed model has its layers stacked once, when they are rewritten
(``quantize.replace_linear_layers``). Which layers stack is decided on entry, and a stacked product
no longer asks its layers: merge, unmerge or switch adapters off and on outside the block, never
inside it. A LoRA layer knows while it is stacked (``LoRALinear.stacked``) and refuses to merge or
unmerge then, and ``lora_disabled`` raises when it ends inside the block (a ``stream`` begun
inside it and left unfinished), rather than letting sampling go on without the adapter.

Stacking and giving back run outside inference mode even when sampling runs inside it (Lightning
validates under ``torch.inference_mode`` by default, and sample generations run there): a
weight given back as an inference tensor could never again be saved for a backward pass, and
training would fail at its next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llm_lightning import nf4
from llm_lightning.linear import Linear
from llm_lightning.lora import LoRALinear
from llm_lightning.model import LLaMA


def _plain_product(layer: nn.Module) -> bool:
    """Whether the layer's forward is ``linear(x, weight)`` alone: a plain ``Linear``, or a LoRA
    layer whose adapter is merged into its weight or switched off (``lora_disabled``)."""
    adapter_out_of_the_way = isinstance(layer, LoRALinear) and (layer.merged or layer.disabled)
    return (type(layer) is Linear or adapter_out_of_the_way) and layer.bias is None


def _stackable(layers: tuple[nn.Module, ...]) -> bool:
    if not all(_plain_product(layer) for layer in layers):
        return False
    weights = [layer.weight for layer in layers]
    return (all(type(w.data) is torch.Tensor and not nf4.is_nf4(w) and not w.is_inference() for w in weights)
            and len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1)


def _mark_stacked(layers: tuple[nn.Module, ...], stacked: bool) -> None:
    """Tell the LoRA layers among ``layers`` that a stacked product computes them (see ``LoRALinear.stacked``)."""
    for layer in layers:
        if isinstance(layer, LoRALinear):
            layer.stacked = stacked


def projection_groups(model: LLaMA) -> Iterator[tuple[nn.Module, str, tuple[str, ...]]]:
    """(owner, attribute that holds the stacked product, names of the layers it stacks) for every
    block: the projections that read the same input."""
    for block in model.layers:
        yield block.attention, "fused_qkv", ("wq", "wk", "wv")
        yield block.feed_forward, "fused_w13", ("w1", "w3")


@contextlib.contextmanager
def fused_projections(model: LLaMA) -> Iterator[LLaMA]:
    """Within the block, the q/k/v and w1/w3 products of every block that allows it are one each
    (see the module docstring); on leaving it, the weights are separate tensors again."""
    fused = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for owner, attribute, names in projection_groups(model):
                if getattr(owner, attribute) is not None:
                    continue  # stacked already: by an enclosing block, or by a sampling-only rewrite (``quantize.py``)
                layers = tuple(getattr(owner, name) for name in names)
                if not _stackable(layers):
                    continue
                stacked = torch.cat([layer.weight for layer in layers])
                for layer, rows in zip(layers, stacked.split([layer.weight.shape[0] for layer in layers])):
                    layer.weight.data = rows
                setattr(owner, attribute, stacked)
                fused.append((owner, attribute, layers))
                _mark_stacked(layers, True)
        yield model
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for owner, attribute, layers in fused:
                for layer in layers:
                    layer.weight.data = layer.weight.data.clone()
                setattr(owner, attribute, None)
                _mark_stacked(layers, False)
