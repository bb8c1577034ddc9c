"""Sample from a LLaMA: ``python generate.py prompt="..." [model=...] [ckpt_path=last] [temperature=0.7]``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from llm_lightning import load_pretrained
from llm_lightning.adapter import find_last_checkpoint, load_adapter
from llm_lightning.cli import exit_on_user_error
from llm_lightning.generation import generate_text
from llm_lightning.prompts import get_template


@exit_on_user_error
def generate(cfg: DictConfig) -> str:
    model, tokenizer = load_pretrained(cfg.model, tokenizer=cfg.tokenizer,
                                       dtype=getattr(torch, cfg.dtype), device=cfg.device)
    template_name = cfg.template or "chat"
    if cfg.ckpt_path:
        path = find_last_checkpoint() if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
        checkpoint = load_adapter(model, tokenizer, path, force=cfg.force_adapter_load)
        template_name = cfg.template or checkpoint.get("provenance", {}).get("template_name", "alpaca")
        print(f"[adapter {path}, step {checkpoint.get('global_step')}, template {template_name}]", file=sys.stderr)
    prompt = get_template(template_name).format(cfg.prompt)
    start = time.perf_counter()
    text = generate_text(
        model, tokenizer, prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    elapsed = time.perf_counter() - start
    n_tokens = len(tokenizer.encode(text, bos=False))
    print(f"\n\n[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return text


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
