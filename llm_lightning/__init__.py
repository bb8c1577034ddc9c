"""LoRA fine-tuning and sampling of LLaMA-family models with PyTorch Lightning and Hydra."""

from llm_lightning.config import LLaMAConfig, RopeScaling
from llm_lightning.errors import CheckpointError, TokenizerError, UserFacingError
from llm_lightning.generation import generate, stream
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.model import LLaMA
from llm_lightning.loading import load_pretrained
from llm_lightning.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError", "LLaMA", "LLaMAConfig", "LoRAConfig", "RopeScaling", "Tokenizer", "TokenizerError",
    "UserFacingError", "apply_lora", "generate", "load_pretrained", "load_tokenizer", "stream",
]
