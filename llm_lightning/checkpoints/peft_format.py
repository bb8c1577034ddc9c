"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, read and written.

PEFT names modules as transformers does and applies LoRA to HF's q/k row layout, so a B matrix of
q or k is permuted like the weight it updates (``hf_format.permute_qk``), and so is a DoRA
magnitude (one value per row); A matrices act on the input side, which no permutation touches.
LoRA and DoRA (``use_dora``) are read; rsLoRA and per-module ranks or alphas are refused rather
than half applied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm_lightning.checkpoints.hf_format import PEFT_TARGETS, hf_to_meta_name, meta_to_hf_name, permute_qk
from llm_lightning.errors import CheckpointError, UserFacingError
from llm_lightning.lora import LoRAConfig, LoRALinear, apply_lora, load_lora_state_dict
from llm_lightning.model import LLaMA

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
UNSUPPORTED = ("use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")
# PEFT's tensor names for ours: lora_A.weight, lora_B.weight, lora_magnitude_vector.
PEFT_TENSORS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def load_peft_adapter(model: LLaMA, directory: Path) -> dict[str, Any]:
    """Add the adapter's LoRA layers to ``model`` and load them; returns the adapter's settings
    in the shape of a training checkpoint (no provenance: PEFT records none)."""
    from safetensors import safe_open

    config_path = directory / CONFIG
    try:
        settings = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    unsupported = [k for k in UNSUPPORTED if settings.get(k)]
    if settings.get("peft_type", "LORA") != "LORA" or unsupported:
        raise CheckpointError(f"{config_path}: only LoRA and DoRA adapters are supported "
                              f"(found {unsupported or settings['peft_type']})")
    try:
        targets = tuple(PEFT_TARGETS[m] for m in settings["target_modules"])
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: target module {exc.args[0]!r} is not a LLaMA linear layer") from None
    apply_lora(model, LoRAConfig(r=settings["r"], alpha=settings["lora_alpha"], dropout=settings.get("lora_dropout", 0.0),
                                 targets=targets, dora=bool(settings.get("use_dora"))))
    ours_by_peft = {peft: ours for ours, peft in PEFT_TENSORS.items()}
    adapter = {}
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        for key in handle.keys():
            stem = key.removeprefix("base_model.model.")
            kind = next((k for k in ours_by_peft if stem.endswith(f".{k}")), None)
            name = hf_to_meta_name(f"{stem.removesuffix(f'.{kind}')}.weight") if kind else None
            if name is None:
                raise CheckpointError(f"{directory}: unexpected adapter tensor {key!r}")
            ours = name.removesuffix("weight") + ours_by_peft[kind]
            adapter[ours] = _permute_rows(ours, handle.get_tensor(key), model.config, to_hf=False)
    try:
        load_lora_state_dict(model, adapter)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    return {"provenance": {}, "global_step": None, "lora_config": settings}


def _permute_rows(name: str, tensor: torch.Tensor, config, *, to_hf: bool) -> torch.Tensor:
    """A B matrix's or magnitude's rows between our q/k layout and HF's; A has no output rows."""
    if name.endswith(".lora_a"):
        return tensor
    if tensor.ndim == 1:  # a DoRA magnitude: one value per output row
        return permute_qk(name, tensor[:, None], config, to_hf=to_hf)[:, 0]
    return permute_qk(name, tensor, config, to_hf=to_hf)


def peft_state_dict(model: LLaMA) -> tuple[dict[str, torch.Tensor], list[str], LoRALinear]:
    """PEFT-named adapter tensors, the HF module names they target, and one LoRA layer (for r/alpha)."""
    state, targets, example = {}, set(), None
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        example = module
        hf_module = meta_to_hf_name(f"{name}.weight").removesuffix(".weight")
        targets.add(hf_module.rsplit(".", 1)[-1])
        for ours, peft in PEFT_TENSORS.items():
            if hasattr(module, ours):
                tensor = _permute_rows(f"{name}.{ours}", getattr(module, ours).detach(), model.config, to_hf=True)
                state[f"base_model.model.{hf_module}.{peft}"] = tensor.contiguous()
    if example is None:
        raise UserFacingError("the model has no LoRA layers to export")
    return state, sorted(targets), example


def save_peft_adapter(model: LLaMA, directory: Path, base: str | None) -> None:
    from safetensors.torch import save_file

    state, targets, example = peft_state_dict(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": example.r,
        "lora_alpha": example.scaling * example.r, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base, "modules_to_save": None, "use_dora": example.dora,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    save_file({k: v.cpu() for k, v in state.items()}, directory / WEIGHTS, metadata={"format": "pt"})
