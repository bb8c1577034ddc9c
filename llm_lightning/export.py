"""Take a fine-tuned adapter out of the framework.

    python -m llm_lightning.export ckpt_path=<train .ckpt | last> format=hf|peft|meta output_dir=DIR [model=BASE]

- ``hf``: LoRA merged into the base; ``config.json`` + ``model.safetensors`` + tokenizer files,
  loadable by ``transformers.AutoModelForCausalLM``.
- ``peft``: the adapter alone, as ``adapter_config.json`` + ``adapter_model.safetensors`` with HF
  module names and HF's q/k row permutation applied to the B matrices, for ``peft.PeftModel``.
- ``meta``: merged weights as ``params.json`` + ``consolidated.00.pth``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm_lightning.adapter import find_last_checkpoint, load_adapter
from llm_lightning.checkpoints.hf_export import save_hf_checkpoint
from llm_lightning.checkpoints.hf_format import meta_to_hf_name, permute_to_hf
from llm_lightning.checkpoints.meta_format import save_meta_checkpoint
from llm_lightning.cli import exit_on_user_error, parse_settings
from llm_lightning.errors import UserFacingError
from llm_lightning.lora import LoRALinear, merge_lora
from llm_lightning.model import LLaMA
from llm_lightning.pretrained import load_pretrained
from llm_lightning.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

DEFAULTS = {"ckpt_path": None, "format": "hf", "output_dir": None, "model": None, "tokenizer": None,
            "force_adapter_load": False}
FORMATS = ("hf", "peft", "meta")


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Tokenizer files in the layout transformers reads (tokenizer.json or tokenizer.model + config)."""
    def token(token_id: int | None) -> str | None:
        if token_id is None:
            return None
        if isinstance(tokenizer, HFTokenizer):
            return tokenizer.tok.id_to_token(token_id)
        return tokenizer.sp.id_to_piece(token_id)

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tok.save(str(directory / "tokenizer.json"))
    elif isinstance(tokenizer, SentencePieceTokenizer):
        (directory / "tokenizer.model").write_bytes(tokenizer._proto)
    settings = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "pad_token": token(tokenizer.pad_id), "add_bos_token": tokenizer.add_bos,
                "add_eos_token": False, "model_max_length": 1_000_000}
    if tokenizer.chat_template:
        settings["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def peft_adapter(model: LLaMA) -> tuple[dict[str, torch.Tensor], list[str], LoRALinear]:
    """PEFT-named adapter tensors, the HF module names they target, and one LoRA layer (for r/alpha)."""
    config = model.config
    heads = {"wq": config.n_heads, "wk": config.kv_heads}
    state, targets, example = {}, set(), None
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        example = module
        hf_module = meta_to_hf_name(f"{name}.weight").removesuffix(".weight")
        targets.add(hf_module.rsplit(".", 1)[-1])
        lora_b = module.lora_b.detach()
        kind = name.rsplit(".", 1)[-1]
        if kind in heads:  # the update's rows follow the q/k weight rows into HF's layout
            lora_b = permute_to_hf(lora_b, heads[kind])
        state[f"base_model.model.{hf_module}.lora_A.weight"] = module.lora_a.detach().contiguous()
        state[f"base_model.model.{hf_module}.lora_B.weight"] = lora_b.contiguous()
    if example is None:
        raise UserFacingError("the model has no LoRA layers to export")
    return state, sorted(targets), example


def save_peft(model: LLaMA, directory: Path, base: str | None) -> None:
    from safetensors.torch import save_file

    state, targets, example = peft_adapter(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": example.r,
        "lora_alpha": example.scaling * example.r, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base, "modules_to_save": None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.cpu() for k, v in state.items()}, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def export(settings: dict) -> Path:
    if settings["format"] not in FORMATS:
        raise UserFacingError(f"format={settings['format']}: expected one of {', '.join(FORMATS)}")
    if not settings["ckpt_path"] or not settings["output_dir"]:
        raise UserFacingError("ckpt_path=... and output_dir=... are required")
    output = Path(settings["output_dir"])
    model, tokenizer = load_pretrained(settings["model"], tokenizer=settings["tokenizer"])
    ckpt = find_last_checkpoint() if settings["ckpt_path"] == "last" else Path(settings["ckpt_path"])
    load_adapter(model, tokenizer, ckpt, force=settings["force_adapter_load"])
    output.mkdir(parents=True, exist_ok=True)
    if settings["format"] == "peft":
        save_peft(model, output, settings["model"])
        return output
    merge_lora(model)
    if settings["format"] == "hf":
        save_hf_checkpoint(model, output, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    else:
        save_meta_checkpoint(model, output)
    save_tokenizer(tokenizer, output)
    return output


@exit_on_user_error
def main(argv: list[str]) -> None:
    settings = parse_settings(argv, DEFAULTS)
    print(f"exported {settings['format']} to {export(settings)}")


if __name__ == "__main__":
    main(sys.argv[1:])
