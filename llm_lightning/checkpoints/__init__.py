"""Checkpoint formats: Meta ``consolidated.*.pth``, Hugging Face safetensors/bin, and GGUF."""

from llm_lightning.checkpoints.gguf_format import is_gguf_file, load_gguf_checkpoint
from llm_lightning.checkpoints.hf_format import is_hf_checkpoint, load_hf_checkpoint
from llm_lightning.checkpoints.meta_format import is_meta_checkpoint, load_meta_checkpoint, save_meta_checkpoint

__all__ = [
    "is_gguf_file", "is_hf_checkpoint", "is_meta_checkpoint",
    "load_gguf_checkpoint", "load_hf_checkpoint", "load_meta_checkpoint", "save_meta_checkpoint",
]
