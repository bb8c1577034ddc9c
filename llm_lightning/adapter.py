"""Putting a trained adapter back on its base model, from a training checkpoint (``.ckpt``).

The checkpoint says which LoRA layout it needs (``lora_config``) and which base and tokenizer it
was trained with (``provenance``); a mismatch is refused unless forced.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llm_lightning import nf4
from llm_lightning.checkpoints.peft_format import is_peft_adapter, load_peft_adapter
from llm_lightning.errors import CheckpointError
from llm_lightning.lora import LoRAConfig, apply_lora, load_lora_state_dict
from llm_lightning.model import LLaMA
from llm_lightning.prompts import ChatTemplate, bind, get_template
from llm_lightning.provenance import build_provenance, check_provenance
from llm_lightning.reward_model import HEAD_KEY, score_head
from llm_lightning.tokenizer import Tokenizer

MODULE_PREFIX = "model."  # the LightningModule holds the LLaMA as ``self.model``


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable training checkpoint ({first_line[:200]})") from None
    if "lora_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not an llm_lightning training checkpoint (no lora_config/state_dict)")
    return checkpoint


def checkpoint_stage(path: str | Path) -> str:
    """What trained the adapter at ``path``: ``sft``, ``dpo`` or ``rm`` (a PEFT adapter dir: ``sft``)."""
    if is_peft_adapter(Path(path)):
        return "sft"
    return read_training_checkpoint(path).get("stage", "sft")


def load_adapter(model: LLaMA, tokenizer: Tokenizer, path: str | Path, *, force: bool = False,
                 reward_model: bool = False, quantize_base: bool = True) -> dict[str, Any]:
    """Apply an adapter to ``model``: a training checkpoint (layout, weights and provenance checks)
    or a PEFT adapter directory (which carries no provenance). Returns the checkpoint's contents.
    A reward model's checkpoint (``stage=rm``) is refused unless ``reward_model`` (``load_reward_model``).
    A QLoRA adapter's base is stored in NF4 again, as it was trained (the same codes: quantization is
    deterministic, from the weights rounded to the dtype training quantized them in), unless
    ``quantize_base`` is false (export merges into the full-precision base)."""
    path = Path(path)
    if is_peft_adapter(path) and not reward_model:
        return load_peft_adapter(model, path)
    checkpoint = read_training_checkpoint(path)
    stage = checkpoint.get("stage", "sft")
    if stage == "rm" and not reward_model:
        raise CheckpointError(f"{path}: a reward model (stage=rm) scores answers, it does not write them: "
                              "python -m llm_lightning.score ckpt_path=... (or evaluate.py)")
    if reward_model and stage != "rm":
        raise CheckpointError(f"{path}: trained with stage={stage}, not a reward model (stage=rm)")
    provenance = checkpoint.get("provenance") or {}
    check_provenance(provenance, build_provenance(model, tokenizer), source=str(path), force=force,
                     keys=("base_weights", "tokenizer"))
    config = LoRAConfig.from_dict(checkpoint["lora_config"])
    if config.base_quant and quantize_base:
        nf4.quantize_base(model, getattr(torch, checkpoint.get("base_quant_dtype", "float32")))
    apply_lora(model, config if quantize_base else replace(config, base_quant=None))
    adapter = {k.removeprefix(MODULE_PREFIX): v for k, v in checkpoint["state_dict"].items()
               if not (reward_model and k == HEAD_KEY)}
    try:
        load_lora_state_dict(model, adapter)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return checkpoint


def load_reward_model(model: LLaMA, tokenizer: Tokenizer, path: str | Path, *, force: bool = False,
                      quantize_base: bool = True) -> tuple[torch.nn.Linear, dict[str, Any]]:
    """Apply a reward model's adapter to ``model``; returns its score head and the checkpoint."""
    checkpoint = load_adapter(model, tokenizer, path, force=force, reward_model=True, quantize_base=quantize_base)
    head = score_head(model.config)
    weight = checkpoint["state_dict"].get(HEAD_KEY)
    if weight is None or weight.shape != head.weight.shape:
        raise CheckpointError(f"{path}: no score head of shape {tuple(head.weight.shape)} ({HEAD_KEY})")
    head.weight.data.copy_(weight)
    return head.to(model.tok_embeddings.weight.device).eval(), checkpoint


def trained_template(checkpoint: dict[str, Any], tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template the adapter was trained with, as it rendered then (None for a PEFT
    adapter, which records none)."""
    provenance = checkpoint.get("provenance") or {}
    if provenance.get("chat_template"):
        return bind(provenance.get("template_name", "custom"), provenance["chat_template"], tokenizer)
    if provenance.get("template_name"):  # checkpoints written before the template itself was recorded
        return get_template(provenance["template_name"], tokenizer)
    return None


def choose_template(requested: str | None, checkpoint: dict[str, Any] | None, tokenizer: Tokenizer, *,
                    force: bool = False) -> ChatTemplate:
    """The template to prompt with: the adapter's own; a requested one only if it renders the same
    (or ``force``); without an adapter, the requested one, else the model's own, else plain text."""
    trained = trained_template(checkpoint, tokenizer) if checkpoint else None
    if requested is None:
        if trained is not None:
            return trained
        return get_template("auto" if tokenizer.chat_template else "none", tokenizer)
    template = get_template(requested, tokenizer)
    if trained is not None and template.source != trained.source and not force:
        raise CheckpointError(
            f"template={requested} is not the template the adapter was trained with ({trained.name}); "
            "leave template unset to use that one, or pass force_adapter_load=true")
    return template
