"""One dataclass describes every LLaMA-family model we build, with named presets.

The FFN width follows Meta's reference code (``multiple_of`` and ``ffn_dim_multiplier``) so
that a preset reproduces the official parameter count exactly; checkpoints that state their
width explicitly (Hugging Face ``intermediate_size``, GGUF ``feed_forward_length``) set
``hidden_dim`` instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 rotary frequency scaling (Meta's ``apply_scaling``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class LLaMAConfig:
    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's FeedForward sizing: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LLaMAConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LLAMA3_1 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)

PRESETS: dict[str, LLaMAConfig] = {
    c.name: c
    for c in [
        LLaMAConfig(name="llama2-7b", dim=4096, n_layers=32, n_heads=32),
        LLaMAConfig(name="llama2-13b", dim=5120, n_layers=40, n_heads=40),
        LLaMAConfig(
            name="llama2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
            ffn_dim_multiplier=1.3, multiple_of=4096,
        ),
        LLaMAConfig(
            name="llama3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            ffn_dim_multiplier=1.3, multiple_of=1024, rope_theta=500000.0, max_seq_len=8192,
        ),
        LLaMAConfig(
            name="llama3.1-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            ffn_dim_multiplier=1.3, multiple_of=1024, rope_theta=500000.0, max_seq_len=131072,
            rope_scaling=_LLAMA3_1,
        ),
        LLaMAConfig(
            name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
            hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
        ),
        LLaMAConfig(
            name="tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
            hidden_dim=160, max_seq_len=256,
        ),
    ]
}
