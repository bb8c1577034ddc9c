"""Sampling from a LLaMA with a preallocated KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from llm_lightning.model import LLaMA
from llm_lightning.tokenizer import Tokenizer


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose mass reaches top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # keep a token while the mass before it is still short of p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_tokens(model: LLaMA, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int | None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                  seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt, stopping at EOS (not yielded)."""
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {model.config.max_seq_len} tokens")
    was_training = model.training
    model.eval()
    model.setup_kv_cache(batch_size=1, max_seq_len=total)
    try:
        logits = model(torch.tensor([prompt_ids], device=device))[:, -1]
        position = len(prompt_ids)
        for _ in range(max_new_tokens):
            next_id = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            token = int(next_id.item())
            if token == eos_id:
                return
            yield token
            logits = model(next_id.view(1, 1), start_pos=position)[:, -1]
            position += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate_text(model: LLaMA, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                  seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """Complete one already-templated prompt; ``on_text`` receives text as it is decoded."""
    decoder = tokenizer.stream_decoder()
    pieces = []
    for token in stream_tokens(model, tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
                               eos_id=tokenizer.eos_id, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed):
        pieces.append(decoder.push(token))
        if on_text and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(decoder.flush())
    if on_text and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces)
