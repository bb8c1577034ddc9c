"""``load_pretrained``: one call from a checkpoint on disk (or the embedded default) to model + tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_lightning.checkpoints import (
    is_gguf_file, is_hf_checkpoint, is_meta_checkpoint,
    load_gguf_checkpoint, load_hf_checkpoint, load_meta_checkpoint,
)
from llm_lightning.default_model import default_model_path
from llm_lightning.errors import CheckpointError, TokenizerError
from llm_lightning.model import LLaMA
from llm_lightning.tokenizer import Tokenizer, load_tokenizer

EXPECTED_SOURCES = (
    "a Meta checkpoint dir (params.json + consolidated.*.pth), a Hugging Face dir "
    "(config.json + *.safetensors or *.bin), or a .gguf file"
)


def _find_tokenizer(directory: Path) -> Path:
    """The tokenizer next to the weights, or one level up (Meta's LLaMA-2 download layout)."""
    for folder in (directory, directory.parent):
        for name in ("tokenizer.json", "tokenizer.model"):
            if (folder / name).is_file():
                return folder / name
    raise TokenizerError(f"{directory}: no tokenizer.json or tokenizer.model here or in the parent directory")


def load_pretrained(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu",
                    tokenizer: str | Path | None = None) -> tuple[LLaMA, Tokenizer]:
    """Load a LLaMA-family model in eval mode and its tokenizer.

    ``source`` is None (the embedded SmolLM2-135M-Instruct), a Meta or Hugging Face checkpoint
    directory, or a ``.gguf`` file. ``tokenizer`` overrides where the tokenizer is read from.
    """
    path = default_model_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; expected {EXPECTED_SOURCES}")
    if is_gguf_file(path):
        model, tok = load_gguf_checkpoint(path, dtype=dtype, device=device)
    elif is_meta_checkpoint(path):
        model, tok = load_meta_checkpoint(path, dtype=dtype, device=device), None
    elif is_hf_checkpoint(path):
        model, tok = load_hf_checkpoint(path, dtype=dtype, device=device), None
    else:
        raise CheckpointError(f"{path}: not a recognised checkpoint; expected {EXPECTED_SOURCES}")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif tok is None:
        tok = load_tokenizer(_find_tokenizer(path))
    if tok.vocab_size > model.config.vocab_size:
        raise TokenizerError(
            f"{getattr(tok, 'source', tokenizer)}: tokenizer has {tok.vocab_size} tokens but the model "
            f"at {path} embeds only {model.config.vocab_size}"
        )
    return model, tok
