"""GGUF files (llama.cpp): model config, weights and tokenizer all come from the one file.

Tensors are dequantized to float by the ``gguf`` package, one at a time. llama.cpp stores q/k
rows in Meta's layout, so names are the only thing translated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_lightning.checkpoints.assemble import assemble_model
from llm_lightning.checkpoints.gguf_tokenizer import tokenizer_from_gguf_metadata
from llm_lightning.config import LLaMAConfig, RopeScaling
from llm_lightning.errors import CheckpointError
from llm_lightning.model import LLaMA, rope_inverse_frequencies
from llm_lightning.tokenizer import Tokenizer

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
_ROPE_FREQS = "rope_freqs.weight"


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def gguf_to_meta_name(name: str) -> str | None:
    match = _LAYER_PATTERN.match(name)
    if match:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight" if match.group(2) in _LAYER_NAMES else None
    stem = name.removesuffix(".weight")
    return f"{_TOP_NAMES[stem]}.weight" if stem in _TOP_NAMES and name.endswith(".weight") else None


class GGUFFile:
    """An opened GGUF file: its metadata as plain Python values and its tensors by name."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        try:
            self.reader = GGUFReader(path)
            self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        except Exception as exc:  # the reader raises ValueError/struct.error/IndexError on damage
            raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt? ({exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks required key {key!r}")
        return self.metadata[key]

    def dequantized(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        try:
            # A plain ndarray view: numpy's memmap subclass makes row-wise dequantizing ~3x slower.
            array = dequantize(tensor.data.view(np.ndarray), tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} uses GGUF type {tensor.tensor_type.name}, "
                "which the installed gguf package cannot dequantize"
            ) from None
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r} is damaged or truncated ({exc})") from None
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if array.shape != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {array.shape}, header says {expected}")
        # Copy unquantized tensors out of the read-only memory map so parameters are writable.
        return torch.from_numpy(np.array(array, copy=not array.flags.writeable, order="C"))


def config_from_gguf(gguf: GGUFFile) -> LLaMAConfig:
    arch = gguf.require("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gguf.path}: GGUF architecture {arch!r} unsupported, expected 'llama'")
    dim = gguf.require("llama.embedding_length")
    heads = gguf.require("llama.attention.head_count")
    if gguf.get("llama.rope.dimension_count", dim // heads) != dim // heads:
        raise CheckpointError(f"{gguf.path}: partial rotary (rope.dimension_count) is unsupported")
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    embedding = gguf.tensors.get("token_embd.weight")
    vocab = gguf.get("llama.vocab_size") or (int(embedding.shape[1]) if embedding is not None else len(tokens))
    config = LLaMAConfig(
        name=str(gguf.get("general.name", gguf.path.stem)),
        vocab_size=vocab,
        dim=dim,
        n_layers=gguf.require("llama.block_count"),
        n_heads=heads,
        n_kv_heads=gguf.get("llama.attention.head_count_kv", heads),
        hidden_dim=gguf.require("llama.feed_forward_length"),
        norm_eps=float(gguf.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=gguf.get("llama.context_length", 4096),
        tie_embeddings="output.weight" not in gguf.tensors,
    )
    if _ROPE_FREQS in gguf.tensors:
        config = _with_llama3_scaling(gguf, config)
    return config


def _with_llama3_scaling(gguf: GGUFFile, config: LLaMAConfig) -> LLaMAConfig:
    """llama.cpp stores LLaMA-3.1 rope scaling as per-frequency divisors; accept them when they
    are what Meta's scaling rule gives, since that rule is all this model implements."""
    scaling = RopeScaling(
        factor=float(gguf.get("llama.rope.scaling.factor", 8.0)),
        original_max_seq_len=int(gguf.get("llama.rope.scaling.original_context_length", 8192)),
    )
    scaled = LLaMAConfig(**{**config.to_dict(), "rope_scaling": scaling})
    plain = rope_inverse_frequencies(config)
    divisors = plain / rope_inverse_frequencies(scaled)
    stored = gguf.dequantized(_ROPE_FREQS).float().flatten()
    if stored.shape != divisors.shape or not torch.allclose(stored, divisors, rtol=1e-3):
        raise CheckpointError(f"{gguf.path}: {_ROPE_FREQS} does not match LLaMA-3.1 rope scaling")
    return scaled


def read_gguf_tokenizer(path: Path) -> Tokenizer:
    return tokenizer_from_gguf_metadata(GGUFFile(path).metadata, str(path))


def load_gguf_checkpoint(path: Path, *, dtype: torch.dtype,
                         device: torch.device | str) -> tuple[LLaMA, Tokenizer]:
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name in gguf.tensors:
            if name == _ROPE_FREQS:
                continue
            meta_name = gguf_to_meta_name(name)
            if meta_name is None:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for a LLaMA model")
            yield meta_name, gguf.dequantized(name)

    model = assemble_model(config, converted(), source=str(path), dtype=dtype, device=device)
    return model, tokenizer_from_gguf_metadata(gguf.metadata, str(path))
