"""The LLaMA decoder: one implementation for every checkpoint format and for training and sampling.

Parameter names and the q/k row layout follow Meta's reference code, so a ``consolidated.*.pth``
or a GGUF file loads without renaming rows; Hugging Face checkpoints are converted on load.
Rotary embeddings therefore rotate adjacent pairs ``(x[2i], x[2i+1])`` as Meta does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_lightning.config import LLaMAConfig
from llm_lightning.linear import Linear, linear
from llm_lightning.rms_norm import rms_norm
from llm_lightning.segments import PrefixSegments


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # in fp32 as Meta does, scaled in the input dtype


def stacked_product(x: torch.Tensor, stacked: torch.Tensor | nn.Module) -> torch.Tensor:
    """x through several projections at once: their stacked weight, while sampling stacks them
    (``fused_projections.py``), or the one layer a sampling-only rewrite made of them (``quantize.py``)."""
    return linear(x, stacked) if isinstance(stacked, torch.Tensor) else stacked(x)


def rope_inverse_frequencies(config: LLaMAConfig, device: torch.device | None = None) -> torch.Tensor:
    """Per-pair rotation speeds, with LLaMA-3.1 scaling of the low frequencies when configured."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (config.rope_theta ** (half / config.head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def rope_rotations(config: LLaMAConfig, positions: torch.Tensor) -> torch.Tensor:
    """(cos, sin) of every rotation angle, [B, T, 1, head_dim/2, 2] in fp32, for integer positions [B, T]."""
    angles = positions.float()[..., None] * rope_inverse_frequencies(config, positions.device)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[:, :, None]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, H, D] by ``rope_rotations``, in fp32.

    Eager PyTorch runs it as one complex multiply, one kernel forward and backward: about 8x faster
    on CPU than real cos/sin arithmetic with slices and a stack (measured at 4 x 256 x 9 x 64).
    Inductor generates no code for complex numbers, so under ``torch.compile`` the same rotation is
    written in real arithmetic, which it fuses into the neighbouring kernels."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        rotated = rotate_pairs_real(pairs, rotations)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations))
    return rotated.flatten(-2).type_as(x)


def rotate_pairs_real(pairs: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (a cos - b sin, a sin + b cos): the complex multiply of ``apply_rope`` in real numbers."""
    a, b = pairs.unbind(-1)
    cos, sin = rotations.unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding, written in place at ``start_pos``.

    ``start_pos`` is a Python int in eager decoding: the step attends to the written prefix only.
    A tensor ``start_pos`` is the static-shape mode for compiled decoding and CUDA graphs: every
    step writes through ``index_copy_`` and attends over all slots (the model's mask hides the
    unwritten ones), so no shape and no Python number changes from one token to the next.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = k.shape[0]
        if isinstance(start_pos, torch.Tensor):
            slots = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k[:batch].index_copy_(2, slots, k)
            self.v[:batch].index_copy_(2, slots, v)
            return self.k[:batch], self.v[:batch]
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        keys, values = (self.k, self.v) if batch == self.k.shape[0] else (self.k[:batch], self.v[:batch])
        keys.narrow(2, start_pos, k.shape[2]).copy_(k)
        values.narrow(2, start_pos, k.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class Attention(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wv = Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        #: wq, wk and wv as one product (``stacked_product``); a sampling-only model holds only this.
        self.fused_qkv: torch.Tensor | nn.Module | None = None

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | PrefixSegments | None,
                start_pos: int | torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        if self.fused_qkv is not None:
            # q's and k's columns are adjacent in the stacked product, so one rotation serves both.
            heads = self.n_heads + self.n_kv_heads
            qkv = stacked_product(x, self.fused_qkv)
            qk, v = qkv.split([heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
            qk = apply_rope(qk.view(batch, seq_len, heads, self.head_dim), rotations)
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        else:
            q = apply_rope(self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim), rotations)
            k = apply_rope(self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim), rotations)
            v = self.wv(x)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(mask, PrefixSegments):
            y = mask.attend(q, k, v, self.kv_cache)
        else:
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(start_pos, k, v)
            causal = mask is None and seq_len > 1 and k.shape[2] == seq_len
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.wo(y.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = Linear(config.dim, hidden, bias=False)
        self.w2 = Linear(hidden, config.dim, bias=False)
        self.w3 = Linear(config.dim, hidden, bias=False)
        #: w1 and w3 as one product (``stacked_product``); a sampling-only model holds only this.
        self.fused_w13: torch.Tensor | nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_w13 is not None:
            gate, up = stacked_product(x, self.fused_w13).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | PrefixSegments | None,
                start_pos: int | torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LLaMA(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = config.activation_checkpointing
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models have no separate output matrix, exactly as their checkpoints store them.
        self.output = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, bias=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Preallocate a KV cache in every layer; forward then takes ``start_pos``."""
        weight = self.tok_embeddings.weight
        max_seq_len = max_seq_len or self.config.max_seq_len
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, self.config.kv_heads, max_seq_len, self.config.head_dim,
                dtype or weight.dtype, device or weight.device,
            )

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def attention_mask(self, seq_len: int, start_pos: int | torch.Tensor,
                       key_padding_mask: torch.Tensor | None, device: torch.device,
                       document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean mask [B|1, 1, T, S] (True = attend), or None when plain causal attention suffices.

        ``document_ids`` [B, T] (packed rows, no cache) makes it block-diagonal: a token sees only
        the earlier tokens of its own document.

        Padding keys are hidden, but every query may always see itself, so that a padding row
        never attends to nothing (which would make SDPA produce NaN and poison later layers).
        With a tensor ``start_pos`` (static-shape decoding) the keys are every cache slot, and the
        causal condition is what hides the slots not yet written.
        """
        static = isinstance(start_pos, torch.Tensor)
        if document_ids is not None:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            return (document_ids[:, None, :, None] == document_ids[:, None, None, :]) & causal
        if not static and key_padding_mask is None and (start_pos == 0 or seq_len == 1):
            return None
        key_len = self.layers[0].attention.kv_cache.k.shape[2] if static else start_pos + seq_len
        query_pos = (start_pos + torch.arange(seq_len, device=device))[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        mask = (key_pos <= query_pos)[None, None]
        if key_padding_mask is not None:
            valid = key_padding_mask[:, None, None, :key_len].bool()
            mask = mask & (valid | (key_pos == query_pos)[None, None])
        return mask

    def hidden_states(self, input_ids: torch.Tensor, *, start_pos: int | torch.Tensor = 0,
                      positions: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None,
                      segments: PrefixSegments | None = None) -> torch.Tensor:
        """Final normalised hidden states [B, T, dim], before the output projection.

        ``segments`` says that the one row of ``input_ids`` packs several rows that each continue
        the prefix held in the KV cache (see ``segments.py``); the cache is read, not written."""
        batch, seq_len = input_ids.shape
        if segments is not None:
            positions, mask = segments.positions(input_ids.device), segments
        else:
            if positions is None:
                positions = (start_pos + torch.arange(seq_len, device=input_ids.device)).expand(batch, -1)
            mask = self.attention_mask(seq_len, start_pos, key_padding_mask, input_ids.device, document_ids)
        rotations = rope_rotations(self.config, positions)
        x = self.tok_embeddings(input_ids)
        use_checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpointing:
                x = checkpoint(layer, x, rotations, mask, start_pos, use_reentrant=False)
            else:
                x = layer(x, rotations, mask, start_pos)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, *, start_pos: int | torch.Tensor = 0,
                positions: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T].

        ``start_pos`` is where these tokens sit in the KV cache (0 without a cache; a 0-dim
        tensor for static-shape decoding, see ``KVCache``);
        ``positions`` overrides rotary positions per row (for left-padded batches);
        ``key_padding_mask`` [B, S] marks real tokens (True) among all keys seen so far;
        ``document_ids`` [B, T] keeps the documents of a packed row apart (see ``data/packing.py``).
        """
        x = self.hidden_states(input_ids, start_pos=start_pos, positions=positions,
                               key_padding_mask=key_padding_mask, document_ids=document_ids)
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection of ``hidden_states``: scorers apply it to the few positions they read."""
        if self.output is None:
            return linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)
