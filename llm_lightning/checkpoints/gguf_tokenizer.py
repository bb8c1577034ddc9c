"""Rebuild a tokenizer from the vocabulary a GGUF file embeds (``tokenizer.ggml.*`` metadata).

- ``llama`` kind (LLaMA 1/2 SentencePiece): the pieces, scores and types are written back into a
  SentencePiece ``ModelProto``, so SentencePiece itself tokenizes exactly as the original model.
- ``gpt2`` kind (byte-level BPE: SmolLM2, LLaMA 3): a ``tokenizers`` BPE model from the vocab and
  merges, with the pre-tokenizer that ``tokenizer.ggml.pre`` names; control tokens become special
  tokens so ``<|im_start|>`` encodes as one id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_lightning.errors import TokenizerError
from llm_lightning.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

# GGUF token types (llama.cpp's llama_token_type), numbered as SentencePiece numbers them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(kind: str, source: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind in ("gpt-2", "gpt2", "default"):
        return byte_level
    if kind in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise TokenizerError(
        f"{source}: GGUF pre-tokenizer {kind!r} is not supported; expected smollm, gpt-2 or llama-bpe"
    )


def _bpe_tokenizer(meta: dict[str, Any], source: str) -> HFTokenizer:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RawTokenizer

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    raw.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)
    ])
    return HFTokenizer(
        raw, source,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta["tokenizer.ggml.eos_token_id"],
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
        add_bos=meta.get("tokenizer.ggml.add_bos_token", False),
        chat_template=meta.get("tokenizer.chat_template"),
        end_of_turn_ids=[meta[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                         if isinstance(meta.get(key), int)],
    )


def _sentencepiece_tokenizer(meta: dict[str, Any], source: str) -> SentencePieceTokenizer:
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    proto = sp_model.ModelProto()
    proto.trainer_spec.model_type = sp_model.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = BYTE in types
    proto.trainer_spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    proto.trainer_spec.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    proto.trainer_spec.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    proto.trainer_spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind
    tokenizer = SentencePieceTokenizer(proto.SerializeToString(), source,
                                       add_bos=meta.get("tokenizer.ggml.add_bos_token", True))
    tokenizer.chat_template = meta.get("tokenizer.chat_template")
    return tokenizer


_BUILDERS: dict[str, Callable[[dict[str, Any], str], Tokenizer]] = {
    "gpt2": _bpe_tokenizer,
    "llama": _sentencepiece_tokenizer,
}


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise TokenizerError(f"{source}: GGUF tokenizer kind {kind!r} unsupported, expected gpt2 or llama")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.eos_token_id" not in meta:
        raise TokenizerError(f"{source}: GGUF metadata lacks tokenizer.ggml.tokens or eos_token_id")
    return _BUILDERS[kind](meta, source)
