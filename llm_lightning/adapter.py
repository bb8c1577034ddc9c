"""Putting a trained adapter back on its base model, from a training checkpoint (``.ckpt``).

The checkpoint says which LoRA layout it needs (``lora_config``) and which base and tokenizer it
was trained with (``provenance``); a mismatch is refused unless forced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm_lightning.checkpoints.hf_format import PEFT_TARGETS, hf_to_meta_name, permute_from_hf
from llm_lightning.errors import CheckpointError
from llm_lightning.lora import LoRAConfig, apply_lora, load_lora_state_dict
from llm_lightning.model import LLaMA
from llm_lightning.prompts import get_template
from llm_lightning.provenance import build_provenance, check_provenance
from llm_lightning.tokenizer import Tokenizer

MODULE_PREFIX = "model."  # the LightningModule holds the LLaMA as ``self.model``


def find_last_checkpoint(root: Path = Path("outputs")) -> Path:
    """The newest ``last.ckpt`` of any run under ``root`` (``outputs/<name>/<time>/checkpoints``)."""
    candidates = sorted(root.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"ckpt_path=last: no {root}/*/*/checkpoints/last.ckpt; train first (python train.py)")
    return candidates[-1]


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


def load_peft_adapter(model: LLaMA, directory: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), as
    our ``format=peft`` export or PEFT itself writes it for a LLaMA: HF names mapped back and the
    HF q/k row permutation undone on the B matrices."""
    from safetensors import safe_open

    config_path = directory / "adapter_config.json"
    try:
        settings = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if settings.get(k)]
    if settings.get("peft_type", "LORA") != "LORA" or unsupported:
        raise CheckpointError(f"{config_path}: only plain LoRA adapters are supported (found {unsupported or settings['peft_type']})")
    try:
        targets = tuple(PEFT_TARGETS[m] for m in settings["target_modules"])
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: target module {exc.args[0]!r} is not a LLaMA linear layer") from None
    apply_lora(model, LoRAConfig(r=settings["r"], alpha=settings["lora_alpha"],
                                 dropout=settings.get("lora_dropout", 0.0), targets=targets))
    heads = {"wq": model.config.n_heads, "wk": model.config.kv_heads}
    adapter = {}
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            module, kind = key.removeprefix("base_model.model.").rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            name = hf_to_meta_name(f"{module}.weight")
            if name is None or kind not in ("lora_A", "lora_B"):
                raise CheckpointError(f"{directory}: unexpected adapter tensor {key!r}")
            tensor = handle.get_tensor(key)
            layer_kind = name.split(".")[-2]
            if kind == "lora_B" and layer_kind in heads:
                tensor = permute_from_hf(tensor, heads[layer_kind])
            adapter[name.removesuffix("weight") + ("lora_a" if kind == "lora_A" else "lora_b")] = tensor
    try:
        load_lora_state_dict(model, adapter)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    return {"provenance": {}, "global_step": None, "lora_config": settings}


def load_adapter(model: LLaMA, tokenizer: Tokenizer, path: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Apply an adapter to ``model``: a training checkpoint (layout, weights and provenance checks)
    or a PEFT adapter directory (which carries no provenance). Returns the checkpoint's contents."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return load_peft_adapter(model, path)
    checkpoint = read_training_checkpoint(path)
    provenance = checkpoint.get("provenance") or {}
    template = get_template(provenance.get("template_name", "alpaca"))
    check_provenance(provenance, build_provenance(model, tokenizer, template), source=str(path), force=force,
                     keys=("base_weights", "tokenizer"))
    settings = dict(checkpoint["lora_config"])
    apply_lora(model, LoRAConfig(r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"],
                                 targets=tuple(settings["targets"])))
    adapter = {k.removeprefix(MODULE_PREFIX): v for k, v in checkpoint["state_dict"].items()}
    try:
        load_lora_state_dict(model, adapter)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return checkpoint
