"""The FLOP count behind MFU: (4N + 12·L·d·T) per token for LoRA on a frozen base."""

from __future__ import annotations

import functools

import torch

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.module import LoRAFineTuner


def test_llama2_7b_flops_per_token():
    with torch.device("meta"):
        model = apply_lora(LLaMA(LLaMAConfig.from_name("llama2-7b")), LoRAConfig(r=16, targets=("all",)))
    module = LoRAFineTuner(model, lora=LoRAConfig(r=16), optimizer=functools.partial(torch.optim.AdamW))
    matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert matmul == 6_607_077_376
    assert module.flops(1, 2048, backward=True) == 2048 * (4 * matmul + 12 * 32 * 4096 * 2048)
    assert module.flops(2, 512, backward=False) == 2 * 512 * (2 * matmul + 4 * 32 * 4096 * 512)
