"""What an adapter was trained on: fingerprints of the base weights, tokenizer and prompt template.

An adapter only means something on the base it was trained with. Fingerprints are stored in
every checkpoint and compared when an adapter is loaded, so a LLaMA-2 adapter is never silently
applied to another base. The weight fingerprint samples each tensor at 4,096 evenly spaced
points rounded to bfloat16, so it is cheap for a 70B model and identical whether the base was
loaded in fp32 or bf16.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from llm_lightning.errors import CheckpointError
from llm_lightning.lora import is_lora_parameter
from llm_lightning.prompts import ChatTemplate
from llm_lightning.tokenizer import Tokenizer

SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if is_lora_parameter(name):
            continue
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), SAMPLES_PER_TENSOR)
        index = (torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)).to(flat.device)
        sample = flat[index].to(torch.bfloat16).float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def template_fingerprint(template: ChatTemplate) -> str:
    return hashlib.sha256("\0".join((template.source, template.bos_token, template.eos_token)).encode()).hexdigest()


def build_provenance(model: nn.Module, tokenizer: Tokenizer, template: ChatTemplate | None = None) -> dict[str, str]:
    """Fingerprints, and the chat template itself: generate and export reuse it as trained."""
    provenance = {"base_weights": weights_fingerprint(model), "tokenizer": tokenizer.fingerprint()}
    if template is not None:
        provenance.update(template=template_fingerprint(template), template_name=template.name,
                          chat_template=template.source)
    return provenance


CHECKED = {"base_weights": "base model weights", "tokenizer": "tokenizer", "template": "chat template"}


def check_provenance(saved: dict[str, str] | None, current: dict[str, str], *, source: str, force: bool,
                     keys: tuple[str, ...] = tuple(CHECKED)) -> None:
    """Refuse an adapter whose base weights or tokenizer (or template) differ from the current ones, unless forced."""
    if force:
        return
    if not saved:
        raise CheckpointError(f"{source}: checkpoint has no provenance record; pass force_adapter_load=true to load it anyway")
    for key in keys:
        what = CHECKED[key]
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{source}: adapter was trained with different {what} ({str(saved.get(key))[:12]} vs "
                f"{current[key][:12]} now); pass force_adapter_load=true to load it anyway"
            )
