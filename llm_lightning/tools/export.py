"""``python export.py ckpt_path=<.ckpt | run dir | last> format=hf|peft|meta output_dir=DIR [model.source=BASE]``

Takes a fine-tuned adapter out of the framework:
- ``hf``: LoRA merged into the base; ``config.json`` + ``model.safetensors`` + tokenizer files,
  loadable by ``transformers.AutoModelForCausalLM`` (a reward model, ``stage=rm``: by
  ``AutoModelForSequenceClassification``, with its score head; it has only this format);
- ``peft``: the adapter alone, loadable by ``peft.PeftModel`` on the HF base (``peft_format``);
- ``meta``: merged weights as ``params.json`` + ``consolidated.00.pth``.

Every format gets the tokenizer files too, with the chat template the adapter was trained with
in ``tokenizer_config.json``: transformers' ``apply_chat_template`` then gives the prompt ids
training and ``generate.py`` used.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from llm_lightning.adapter import checkpoint_stage, load_adapter, load_reward_model, trained_template
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.checkpoints.hf_format import save_hf_checkpoint
from llm_lightning.checkpoints.meta_format import save_meta_checkpoint
from llm_lightning.checkpoints.peft_format import save_peft_adapter
from llm_lightning.errors import UserFacingError
from llm_lightning.loading import load_base_model
from llm_lightning.lora import merge_lora
from llm_lightning.settings import ExportSettings, to_settings


def export(cfg: DictConfig) -> Path:
    settings: ExportSettings = to_settings(cfg)
    output = Path(settings.output_dir)
    model, tokenizer = load_base_model(settings.model)
    checkpoint = resolve_checkpoint(settings.ckpt_path, name=settings.name)
    head = None
    if checkpoint_stage(checkpoint) == "rm":
        if settings.format.value != "hf":
            raise UserFacingError(f"{checkpoint}: a reward model (stage=rm) exports as format=hf "
                                  f"(LlamaForSequenceClassification), not format={settings.format.value}")
        head, contents = load_reward_model(model, tokenizer, checkpoint, force=settings.force_adapter_load,
                                           quantize_base=False)
    else:
        # A QLoRA adapter goes onto the full-precision base, which is what a merge should hold.
        contents = load_adapter(model, tokenizer, checkpoint, force=settings.force_adapter_load, quantize_base=False)
    template = trained_template(contents, tokenizer)
    if template is not None:
        tokenizer.chat_template = template.source
    output.mkdir(parents=True, exist_ok=True)
    if settings.format.value == "peft":
        save_peft_adapter(model, output, settings.model.source)
    else:
        merge_lora(model)
        if settings.format.value == "hf":
            save_hf_checkpoint(model, output, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, score_head=head,
                               pad_id=tokenizer.pad_id)
        else:
            save_meta_checkpoint(model, output)
    tokenizer.save_hf(output)
    print(f"exported {settings.format.value} to {output}")
    return output
