"""The base model a run starts from, as the ``model`` config group describes it.

Either real weights (``source``: the embedded default when null, or a Meta/HF/GGUF path) or a
randomly initialised preset (``random_init: true``, used by tests and benchmarks), loaded
directly in the dtype the precision needs so a 7B model never passes through fp32.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llm_lightning.checkpoints.gguf_format import read_gguf_tokenizer
from llm_lightning.config import LLaMAConfig
from llm_lightning.default_model import default_model_path
from llm_lightning.errors import TokenizerError, UserFacingError
from llm_lightning.model import LLaMA
from llm_lightning.pretrained import load_pretrained
from llm_lightning.tokenizer import Tokenizer, load_tokenizer

EMBEDDED_PRESET = "smollm2-135m"


@functools.lru_cache(maxsize=1)
def embedded_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, read once per process (parsing the GGUF vocabulary takes seconds)."""
    return read_gguf_tokenizer(default_model_path())


def load_base_model(model_cfg: Any, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[LLaMA, Tokenizer]:
    """The ``model`` group's model (a DictConfig or ``settings.ModelSettings``) and its tokenizer."""
    if model_cfg.random_init:
        overrides = dict(model_cfg.overrides or {})
        with torch.device(device):
            model = LLaMA(LLaMAConfig.from_name(model_cfg.preset, **overrides)).to(dtype)
        tokenizer_path = model_cfg.tokenizer
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else embedded_tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but model preset "
                                 f"{model_cfg.preset} embeds only {model.config.vocab_size}")
    else:
        source = model_cfg.source
        if source is None and model_cfg.preset != EMBEDDED_PRESET:
            raise UserFacingError(
                f"model.source is required for preset {model_cfg.preset}: point it at a Meta dir, "
                "a Hugging Face dir or a .gguf file (or use dry_run=true to size the run without weights)"
            )
        model, tokenizer = load_pretrained(source, dtype=dtype, device=device, tokenizer=model_cfg.tokenizer)
    model.activation_checkpointing = bool(model_cfg.activation_checkpointing)
    return model, tokenizer
