"""Sampling from a LLaMA with a preallocated KV cache.

Batched prompts are left-padded: each row gets rotary positions counted from its first real
token and a key mask that hides its padding, so a prompt's continuation does not depend on what
it was batched with. Greedy (temperature 0), temperature, top-k, top-p and a repetition penalty
apply per row; beam search runs one prompt at a time with the beams as the batch. Text that could
still be the start of a stop string is held back until the next token decides, so streamed,
batched and whole results agree and never hold part of a stop string.

With ``compile=True`` each decoding step after the prompt is one ``torch.compile``d call with
static shapes (see ``KVCache``): CUDA graphs on a GPU, where eager decoding of a 7B model is
bound by kernel launches rather than by memory bandwidth. The first call compiles.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llm_lightning.errors import SettingError
from llm_lightning.fused_projections import fused_projections
from llm_lightning.model import LLaMA
from llm_lightning.sampling import SamplingOptions, cut_at_stop, held_back
from llm_lightning.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the top-k and outside the smallest set of tokens whose probability mass reaches top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # a token stays while the mass before it is short of p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already in a row's context are divided by it (multiplied if negative)."""
    if penalty == 1.0:
        return logits
    gathered = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(gathered > 0, gathered / penalty, gathered * penalty))


def choose_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Row:
    """One prompt's generation: its decoded text so far, how much of it was handed out, and whether it is done."""

    text: str = ""
    emitted: int = 0
    done: bool = False

    def advance(self, piece: str, stop: tuple[str, ...], *, final: bool) -> str:
        """Take the next decoded ``piece``; return the text that can be handed out now."""
        self.text, hit = cut_at_stop(self.text + piece, stop)
        self.done |= hit or final
        end = len(self.text) if self.done else len(self.text) - held_back(self.text, stop)
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


#: Static-shape caches are sized up to a multiple of this, so prompts of similar length share one
#: compiled graph instead of recompiling for every total length.
STATIC_CACHE_BUCKET = 256


def _decode_step(model: LLaMA, ids: torch.Tensor, start_pos: torch.Tensor, positions: torch.Tensor,
                 key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] of one new token per row; ``start_pos`` (a tensor) is its cache slot."""
    return model(ids, start_pos=start_pos, positions=positions, key_padding_mask=key_padding_mask)[:, -1]


@functools.cache
def compiled_decode_step(device_type: str) -> Callable[..., torch.Tensor]:
    """``_decode_step`` compiled once per device type; "reduce-overhead" replays CUDA graphs."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(_decode_step, mode=mode, fullgraph=True)


def fit_to_context(model: LLaMA, prompt_length: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, clipped (with one warning) so that prompt + answer fit the model's context."""
    room = model.config.max_seq_len - prompt_length
    if room < 1:
        raise SettingError(f"the prompt has {prompt_length} tokens, which fills the model's context of "
                           f"{model.config.max_seq_len}; expected a shorter prompt")
    if max_new_tokens > room:
        log.warning("max_new_tokens=%d clipped to %d: the prompt has %d tokens and the model's context is %d",
                    max_new_tokens, room, prompt_length, model.config.max_seq_len)
    return min(max_new_tokens, room)


# Sampling runs in inference mode, not only without gradients: no view or version tracking, which
# made batch-1 decoding of SmolLM2-135M 8% faster on a 2-core Zen 3 (its cost is in the calls).
# Nothing made inside leaves it but text; the KV cache is dropped on the way out.
@torch.inference_mode()
def _sample(model: LLaMA, tokenizer: Tokenizer, prompt_ids: list[list[int]], options: SamplingOptions, *,
            compile: bool = False) -> Iterator[list[str]]:
    """Yield, after every step, the new text of each row (empty for rows that produced none)."""
    device = model.tok_embeddings.weight.device
    seed, stop, repetition_penalty = options.seed, options.stop, options.repetition_penalty
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    batch, longest = len(prompt_ids), max(len(p) for p in prompt_ids)
    max_new_tokens = fit_to_context(model, longest, options.max_new_tokens)
    total = longest + max_new_tokens
    ids = torch.full((batch, longest), tokenizer.pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, total), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompt_ids):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        real[row, longest - len(prompt):] = True
    padded = bool((~real[:, :longest]).any())
    positions = (real[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    seen = ids.clone()
    rows = [_Row() for _ in prompt_ids]
    decoders = [tokenizer.stream_decoder() for _ in prompt_ids]
    stop_ids = tokenizer.stop_ids

    cache_len = total
    if compile:
        cache_len = min(-(-total // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET, model.config.max_seq_len)
        real = torch.nn.functional.pad(real, (0, cache_len - total))
        decode_step = compiled_decode_step(device.type)
        slot = torch.tensor(longest, device=device)
    model.setup_kv_cache(batch_size=batch, max_seq_len=cache_len)
    try:
        # Only the prompt's last position is scored: the head over every prompt token would be wasted.
        hidden = model.hidden_states(ids, positions=positions, key_padding_mask=real[:, :longest] if padded else None)
        logits = model.logits(hidden[:, -1])
        next_position = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            logits = penalize_repetition(logits, seen, repetition_penalty)
            if step < options.min_new_tokens:
                logits[:, sorted(stop_ids)] = float("-inf")
            next_ids = choose_next(logits, temperature=options.temperature, top_k=options.top_k,
                                   top_p=options.top_p, generator=generator)
            pieces = []
            last = step == max_new_tokens - 1
            for state, decoder, token in zip(rows, decoders, next_ids.tolist()):
                if state.done:
                    pieces.append("")
                elif token in stop_ids:
                    pieces.append(state.advance(decoder.flush(), stop, final=True))
                else:
                    piece = decoder.push(token)
                    pieces.append(state.advance(piece + (decoder.flush() if last else ""), stop, final=last))
            yield pieces
            if all(state.done for state in rows):
                return
            real[:, longest + step] = True
            if repetition_penalty != 1.0:  # the context is only needed to penalise it
                seen = torch.cat([seen, next_ids[:, None]], dim=1)
            if compile:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                logits = decode_step(model, next_ids[:, None], slot, next_position, real if padded else None).clone()
                slot = slot + 1
            else:
                logits = model(next_ids[:, None], start_pos=longest + step, positions=next_position,
                               key_padding_mask=real[:, : longest + step + 1] if padded else None)[:, -1]
            next_position = next_position + 1
    finally:
        model.clear_kv_cache()


@torch.inference_mode()  # as _sample
def _beam_search(model: LLaMA, tokenizer: Tokenizer, prompt: list[int], *, num_beams: int,
                 max_new_tokens: int, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0) -> tuple[list[int], float]:
    """(best continuation ids without EOS, its total log-probability). Hypotheses that end in EOS
    (or another of ``tokenizer.stop_ids``) are ranked by log-probability / length**length_penalty,
    as in Hugging Face transformers; the repetition penalty reshapes each beam's logits over its own
    context before the log-softmax."""
    device = model.tok_embeddings.weight.device
    max_new_tokens = fit_to_context(model, len(prompt), max_new_tokens)
    total = len(prompt) + max_new_tokens
    model.setup_kv_cache(batch_size=num_beams, max_seq_len=total)

    def next_logprobs(logits: torch.Tensor, beams: list[list[int]]) -> torch.Tensor:
        if repetition_penalty != 1.0:
            seen = torch.tensor([prompt + beam for beam in beams], device=device)
            logits = penalize_repetition(logits.float(), seen, repetition_penalty)
        return logits.float().log_softmax(-1)

    stop_ids = tokenizer.stop_ids
    try:
        beams: list[list[int]] = [[]]
        hidden = model.hidden_states(torch.tensor([prompt], device=device))
        logprobs = next_logprobs(model.logits(hidden[:, -1]), beams)
        for layer in model.layers:
            cache = layer.attention.kv_cache
            cache.k[:] = cache.k[:1]
            cache.v[:] = cache.v[:1]
        scores = torch.zeros(1, device=device)
        finished: list[tuple[float, float, list[int]]] = []  # (ranking score, log-prob, ids)
        for step in range(max_new_tokens):
            candidates = (scores[:, None] + logprobs).flatten()
            top_scores, top_index = candidates.topk(min(2 * num_beams, candidates.numel()))
            vocab = logprobs.shape[-1]
            next_beams, next_scores, parents, tokens = [], [], [], []
            for score, index in zip(top_scores.tolist(), top_index.tolist()):
                parent, token = divmod(index, vocab)
                if token in stop_ids:
                    length = len(beams[parent]) + 1
                    finished.append((score / length**length_penalty, score, beams[parent]))
                    continue
                next_beams.append(beams[parent] + [token])
                next_scores.append(score)
                parents.append(parent)
                tokens.append(token)
                if len(next_beams) == num_beams:
                    break
            beams, scores = next_beams, torch.tensor(next_scores, device=device)
            best_open = max(next_scores) / (step + 2) ** length_penalty if next_scores else None
            if len(finished) >= num_beams and (best_open is None or max(f[0] for f in finished) >= best_open):
                beams = []  # the open beams can no longer beat what has finished
                break
            if step == max_new_tokens - 1:
                break
            index = torch.tensor(parents, device=device)
            for layer in model.layers:
                cache = layer.attention.kv_cache
                cache.k[: len(parents)] = cache.k.index_select(0, index)
                cache.v[: len(parents)] = cache.v.index_select(0, index)
            step_input = torch.tensor(tokens, device=device)[:, None]
            logprobs = next_logprobs(model(step_input, start_pos=len(prompt) + step)[:, -1], beams)
        for ids, score in zip(beams, scores.tolist()):
            finished.append((score / (len(ids) + 1) ** length_penalty, score, ids))
        _, logprob, ids = max(finished, key=lambda f: f[0])
        return ids, logprob
    finally:
        model.clear_kv_cache()


def generate(model: LLaMA, tokenizer: Tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, num_beams: int = 1,
             repetition_penalty: float = 1.0, stop: str | Sequence[str] | None = (), seed: int | None = None,
             min_new_tokens: int = 0, compile: bool = False, max_prompt_tokens: int | None = None) -> str | list[str]:
    """Continue already-templated prompts; a single string in gives a single string out.
    The options are checked by ``SamplingOptions``; ``compile`` decodes with a compiled
    static-shape step (beam search stays eager); a prompt longer than ``max_prompt_tokens`` keeps
    its last ones (as evaluation harnesses cut contexts). Each call stacks the projections for
    sampling and gives them back (``fused_projections``): many calls in a row run faster inside
    one ``with fused_projections(model):``, which stacks them once."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              num_beams=num_beams, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                              min_new_tokens=min_new_tokens)
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    prompt_ids = [tokenizer.encode(p, bos=True)[-(max_prompt_tokens or 0):] for p in batch]
    was_training = model.training
    model.eval()
    try:
        with fused_projections(model):
            if num_beams > 1:
                texts = []
                for ids in prompt_ids:
                    best, _ = _beam_search(model, tokenizer, ids, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                           repetition_penalty=repetition_penalty)
                    texts.append(cut_at_stop(tokenizer.decode(best), options.stop)[0])
            else:
                texts = [""] * len(batch)
                for pieces in _sample(model, tokenizer, prompt_ids, options, compile=compile):
                    texts = [t + p for t, p in zip(texts, pieces)]
    finally:
        model.train(was_training)
    return texts[0] if single else texts


def stream(model: LLaMA, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
           stop: str | Sequence[str] | None = (), seed: int | None = None, compile: bool = False) -> Iterator[str]:
    """Yield one prompt's continuation as text pieces, as soon as they cannot be part of a stop string."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    was_training = model.training
    model.eval()
    try:
        with fused_projections(model):
            for pieces in _sample(model, tokenizer, [tokenizer.encode(prompt, bos=True)], options, compile=compile):
                if pieces[0]:
                    yield pieces[0]
    finally:
        model.train(was_training)
