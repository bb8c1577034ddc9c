"""``trainer.precision=bf16-true`` (or ``16-true``) for LoRA: half-precision base, fp32 adapters.

Lightning's ``HalfPrecision`` casts the whole module, so the LoRA tensors, their gradients and
AdamW's moments would be bf16 too, and updates smaller than bf16's resolution of the weight
(lr 3e-4 on a weight of 1.0 is below it) would round away. Here only the frozen base is cast:
it holds nearly all the memory, and the adapter keeps full precision at a cost of a few MB.
``LoRALinear`` runs the adapter path in its own dtype and adds the result in the base's.
"""

from __future__ import annotations

from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from llm_lightning.lora import is_lora_parameter

HALF_PRECISIONS = ("bf16-true", "16-true")


class HalfPrecisionFP32Adapters(HalfPrecision):
    def convert_module(self, module: nn.Module) -> nn.Module:
        for name, parameter in module.named_parameters():
            if parameter.is_floating_point() and not is_lora_parameter(name):
                parameter.data = parameter.data.to(self._desired_input_dtype)
        return module
