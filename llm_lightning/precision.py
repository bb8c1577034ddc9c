"""``trainer.precision``, parsed once into a ``Precision``; and half-precision bases with fp32 adapters.

Accepted: ``32-true`` (fp32), ``bf16-mixed`` (fp32 weights, bf16 autocast), ``bf16-true`` (bf16
base, fp32 adapters) and, on a GPU, ``16-mixed`` (fp32 weights, fp16 autocast, Lightning's grad
scaler). ``16-true`` is refused: fp16 weights and gradients with no loss scaling underflow (small
gradients flush to zero), and there is no master copy to scale into.

Lightning's ``HalfPrecision`` casts the whole module, so the LoRA tensors, their gradients and
AdamW's moments would be bf16 too, and updates smaller than bf16's resolution of the weight
(lr 3e-4 on a weight of 1.0 is below it) would round away. ``HalfPrecisionFP32Adapters`` casts
only the frozen base: it holds nearly all the memory, and the adapter keeps full precision at a
cost of a few MB. ``LoRALinear`` runs the adapter path in its own dtype and adds the result in the base's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from llm_lightning.errors import SettingError
from llm_lightning.lora import is_lora_parameter

#: Lightning's short spellings, as it normalises them.
ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
SUPPORTED = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


@dataclass(frozen=True)
class Precision:
    name: str

    @classmethod
    def parse(cls, value: object) -> Precision:
        name = ALIASES.get(str(value), str(value))
        if name == "16-true":
            raise SettingError("trainer.precision=16-true: fp16 weights and gradients without loss scaling "
                               "underflow; use bf16-true, or 16-mixed on a GPU (fp32 weights, grad scaler)")
        if name not in SUPPORTED:
            raise SettingError(f"trainer.precision={value}: expected one of {', '.join(SUPPORTED)}")
        return cls(name)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The base weights' dtype: bf16 for bf16-true, else fp32 masters."""
        return torch.bfloat16 if self.name == "bf16-true" else torch.float32

    @property
    def half_weights(self) -> bool:
        return self.name == "bf16-true"

    def frozen_dtype(self, quantized_base: bool) -> torch.dtype:
        """The dtype the base is loaded in: what NF4 weights are quantized from and dequantize to,
        and the dtype of the head and norms. Frozen tensors need no fp32 master copy, so with a
        QLoRA base mixed precision loads it in its autocast dtype (as QLoRA loads bf16 weights);
        the token embeddings alone go back to ``weights_dtype`` (fp32), so the residual stream
        stays fp32 as in any mixed-precision run (train.py; PEFT's ``prepare_model_for_kbit_training``
        upcasts the norms too, which are 0.002% of a 7B model and multiply fp32 activations here
        anyway). Otherwise ``weights_dtype``."""
        if quantized_base and self.name in ("bf16-mixed", "16-mixed"):
            return torch.bfloat16 if self.name == "bf16-mixed" else torch.float16
        return self.weights_dtype

    @property
    def activation_bytes(self) -> int:
        return 4 if self.name == "32-true" else 2

    def check_device(self, uses_gpu: bool) -> None:
        """Refuse what the accelerator cannot run, before any weights are loaded."""
        if self.name == "16-mixed" and not uses_gpu:
            raise SettingError("trainer.precision=16-mixed needs a GPU (fp16 autocast on CPU is slow or "
                               "missing); on CPU use 32-true, bf16-mixed or bf16-true")
        if uses_gpu and self.name.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise SettingError(f"trainer.precision={self.name}: this GPU has no bfloat16 support; use 16-mixed")

    def __str__(self) -> str:
        return self.name


class HalfPrecisionFP32Adapters(HalfPrecision):
    def convert_module(self, module: nn.Module) -> nn.Module:
        for name, parameter in module.named_parameters():
            if not parameter.is_floating_point() or is_lora_parameter(name):
                continue
            if parameter.dtype != self._desired_input_dtype:  # train.py loads it so; under FSDP it is a shard by now
                parameter.data = parameter.data.to(self._desired_input_dtype)
        return module
