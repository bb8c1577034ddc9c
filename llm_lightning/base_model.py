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


def weights_dtype(precision: str) -> torch.dtype:
    """bf16-true / 16-true keep weights in half precision; every other setting keeps fp32 masters."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(precision), torch.float32)


@functools.lru_cache(maxsize=1)
def embedded_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, read once per process (parsing the GGUF vocabulary takes seconds)."""
    return read_gguf_tokenizer(default_model_path())


def load_base_model(model_cfg: Any, *, precision: str = "32-true") -> tuple[LLaMA, Tokenizer]:
    dtype = weights_dtype(precision)
    if model_cfg.get("random_init"):
        overrides = dict(model_cfg.get("overrides") or {})
        model = LLaMA(LLaMAConfig.from_name(model_cfg.preset, **overrides)).to(dtype)
        tokenizer_path = model_cfg.get("tokenizer")
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else embedded_tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but model preset "
                                 f"{model_cfg.preset} embeds only {model.config.vocab_size}")
    else:
        source = model_cfg.get("source")
        if source is None and model_cfg.preset != EMBEDDED_PRESET:
            raise UserFacingError(
                f"model.source is required for preset {model_cfg.preset}: point it at a Meta dir, "
                "a Hugging Face dir or a .gguf file (or use dry_run=true to size the run without weights)"
            )
        model, tokenizer = load_pretrained(source, dtype=dtype, tokenizer=model_cfg.get("tokenizer"))
    model.activation_checkpointing = bool(model_cfg.get("activation_checkpointing", False))
    return model, tokenizer
