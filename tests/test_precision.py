"""Half-precision training casts the frozen base only; the adapter stays fp32 and learns."""

from __future__ import annotations

import torch

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.lora import LoRAConfig, apply_lora, is_lora_parameter
from llm_lightning.loss import model_nll
from llm_lightning.precision import HalfPrecisionFP32Adapters


def test_convert_module_casts_the_base_only_and_the_adapter_gets_fp32_gradients():
    torch.manual_seed(0)
    model = apply_lora(LLaMA(LLaMAConfig.from_name("tiny")), LoRAConfig(r=4, targets=("all",)),
                       lora_dtype=torch.float32)
    plugin = HalfPrecisionFP32Adapters("bf16-true")
    plugin.convert_module(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if is_lora_parameter(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not is_lora_parameter(n)} == {torch.bfloat16}

    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with plugin.forward_context():
        assert model(ids).dtype == torch.bfloat16
        loss_sum, _ = model_nll(model.train(), ids, ids)
    loss_sum.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_b" in n]  # B starts at 0, A does not
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
