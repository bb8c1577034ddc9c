"""Rows packed end to end after one shared prefix in the KV cache: how a scoring batch attends.

A batch of benchmark rows that open with the same few-shot prefix runs that prefix once into the
KV cache (see ``loglikelihood.py``). Padding the rest of every row to the batch's longest, and
copying the prefix's keys and values into every row of a batch-wide cache, wasted a tenth of the
matrix products and a fifth of the attention on MMLU's val set. Instead the rows' own tokens are
packed into one sequence, so that the matrix products see only real tokens, and each token attends to

- every position of the shared prefix: one call for the tokens of all rows, with no mask; and
- the earlier tokens of its own row: one causal call per row.

The two partial results are merged exactly as one softmax over the union of their keys: each is
weighted by its share of the total, which the log-sum-exps of the two calls give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_lightning import cpu_kernels

#: Query-by-key scores held at once by the portable attention: 16M floats (64 MB in fp32).
MATH_SCORES_PER_CHUNK = 1 << 24


@dataclass(frozen=True)
class PrefixSegments:
    """The layout of a packed batch: ``lengths`` rows of own tokens, each continuing the first
    ``prefix_length`` positions of every layer's KV cache (0: rows that continue nothing)."""

    prefix_length: int
    lengths: tuple[int, ...]

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Rotary positions [1, sum(lengths)]: every row starts where the prefix ends."""
        start = self.prefix_length
        return torch.cat([torch.arange(start, start + n, device=device) for n in self.lengths])[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Attention of the packed tokens: q [1, H, N, D], k and v [1, KV, N, D] -> [1, H, N, D];
        ``cache`` (a ``model.KVCache``) holds the prefix, which it is not asked to change."""
        if q.shape[0] != 1:
            raise ValueError(f"packed segments come as one row; got a batch of {q.shape[0]}")
        if self.prefix_length and (cache is None or cache.k.shape[2] < self.prefix_length):
            held = 0 if cache is None else cache.k.shape[2]
            raise ValueError(f"segments continue {self.prefix_length} cached positions; the KV cache holds {held}")
        rows = list(zip(*(t.split(self.lengths, dim=2) for t in (q, k, v))))
        if not self.prefix_length:
            return torch.cat([F.scaled_dot_product_attention(qr, kr, vr, is_causal=True,
                                                             enable_gqa=kr.shape[1] != qr.shape[1])
                              for qr, kr, vr in rows], dim=2)
        own, own_lse = (torch.cat(parts, dim=2) for parts in zip(*(
            attention_with_lse(qr, kr, vr, causal=True) for qr, kr, vr in rows)))
        prefix_k = cache.k[:1, :, :self.prefix_length]
        prefix_v = cache.v[:1, :, :self.prefix_length]
        shared, shared_lse = attention_with_lse(q, prefix_k, prefix_v, causal=False)
        prefix_share = torch.sigmoid(shared_lse - own_lse)[..., None]  # fp32, as the merge is
        return (own.float() + prefix_share * (shared.float() - own.float())).to(q.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ / √d) v [B, H, L, D], each query's log-sum-exp of its scores [B, H, L] in fp32).
    k and v may have fewer heads than q (grouped-query attention); ``causal`` needs L == S."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and cpu_kernels.decision("flash_attention_lse"):
        out, lse = cpu_kernels.flash_attention_with_lse(q, k, v, causal=causal)
        return out, lse.float()
    return math_attention_with_lse(q, k, v, causal=causal)


def math_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse`` in portable PyTorch, fp32 scores, in chunks of queries.

    The query heads that share a key head are stacked into one product with it ([G·L, D] by
    [D, S]) rather than the keys repeated for them, as SDPA's ``enable_gqa`` reads them."""
    batch, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    chunk = max(1, MATH_SCORES_PER_CHUNK // (batch * heads * keys))
    k, v = k.float(), v.float()
    outputs, lses = [], []
    for start in range(0, length, chunk):
        part = q[:, :, start:start + chunk].float()
        rows = part.shape[2]
        stacked = part.reshape(batch, kv_heads, groups * rows, dim)
        scores = stacked @ k.transpose(-1, -2) / dim ** 0.5
        if causal:
            query_pos = start + torch.arange(rows, device=q.device).repeat(groups)
            scores = scores.masked_fill(torch.arange(keys, device=q.device) > query_pos[:, None], float("-inf"))
        lse = scores.logsumexp(-1)
        out = (scores - lse[..., None]).exp() @ v
        outputs.append(out.reshape(batch, heads, rows, dim).to(q.dtype))
        lses.append(lse.reshape(batch, heads, rows))
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)
