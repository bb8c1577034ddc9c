"""Sample from a LLaMA: ``python generate.py prompt="..." [ckpt_path=last] [compare=true] [temperature=0.7]``."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from llm_lightning import cpu_kernels, load_pretrained
from llm_lightning.adapter import find_last_checkpoint, load_adapter
from llm_lightning.cli import exit_on_user_error
from llm_lightning.errors import UserFacingError
from llm_lightning.generation import generate as generate_batch
from llm_lightning.generation import stream
from llm_lightning.lora import lora_disabled
from llm_lightning.prompt_files import read_prompts
from llm_lightning.prompts import get_template
from llm_lightning.quantize import can_pack_weights, pack_weights, quantize_int8


def sampling_options(cfg: DictConfig) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                repetition_penalty=cfg.repetition_penalty, stop=list(cfg.stop), seed=cfg.seed, compile=cfg.compile)


@exit_on_user_error
def generate(cfg: DictConfig) -> list[str]:
    model, tokenizer = load_pretrained(cfg.model, tokenizer=cfg.tokenizer,
                                       dtype=getattr(torch, cfg.dtype), device=cfg.device)
    template_name = cfg.template or "chat"
    if cfg.ckpt_path:
        path = find_last_checkpoint() if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
        checkpoint = load_adapter(model, tokenizer, path, force=cfg.force_adapter_load)
        template_name = cfg.template or checkpoint.get("provenance", {}).get("template_name", "alpaca")
        print(f"[adapter {path}, step {checkpoint.get('global_step')}, template {template_name}]", file=sys.stderr)
    elif cfg.compare:
        raise UserFacingError("compare=true needs ckpt_path=... (an adapter to compare with the base model)")
    if cfg.quantize == "int8":
        if cfg.compare:
            raise UserFacingError("quantize=int8 merges the adapter into int8 weights; it cannot compare=true")
        quantize_int8(model)
    elif cfg.quantize is not None:
        raise UserFacingError(f"quantize={cfg.quantize}: expected int8 or null")
    elif cfg.pack_weights and not cfg.compare and not cfg.compile and can_pack_weights(model):
        pack_weights(model)  # exact: the same products from a oneDNN weight layout
    if model.tok_embeddings.weight.device.type == "cpu":
        print(cpu_kernels.describe(), file=sys.stderr)
    template = get_template(template_name)
    pairs = read_prompts(cfg.prompts_file) if cfg.prompts_file else [(cfg.prompt, "")]
    prompts = [template.format(instruction, input) for instruction, input in pairs]
    options = sampling_options(cfg)

    start = time.perf_counter()
    if len(prompts) == 1 and not cfg.compare and cfg.num_beams == 1:
        pieces = []
        for piece in stream(model, tokenizer, prompts[0], **options):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        outputs = ["".join(pieces)]
    else:
        variants = {"fine-tuned" if cfg.compare else "output": contextlib.nullcontext()}
        if cfg.compare:
            variants = {"base": lora_disabled(model), **variants}
        answers: dict[str, list[str]] = {}
        for name, context in variants.items():
            with context:
                answers[name] = []
                for i in range(0, len(prompts), cfg.batch_size):
                    answers[name] += generate_batch(model, tokenizer, prompts[i:i + cfg.batch_size],
                                                    num_beams=cfg.num_beams, **options)
        for index, (instruction, input) in enumerate(pairs):
            print(f"### {index + 1}. {instruction}" + (f"\n[input] {input}" if input else ""))
            for name, texts in answers.items():
                print(f"[{name}] {texts[index]}" if len(answers) > 1 else texts[index])
            print()
        outputs = [text for texts in answers.values() for text in texts]
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(tokenizer.encode(text, bos=False)) for text in outputs)
    print(f"[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return outputs


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
