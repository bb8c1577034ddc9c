"""One tokenizer interface over SentencePiece models and Hugging Face ``tokenizers`` files.

``encode(text, bos=True)`` adds BOS only for models trained with it (LLaMA 1/2/3 are; SmolLM2,
whose GGUF says ``add_bos_token = false``, is not), so callers can always ask for "what the
model expects". ``pad_id`` is chosen distinct from ``eos_id`` whenever the vocabulary allows,
and nothing in this project masks labels by comparing with ``pad_id`` anyway: padding is
tracked by lengths, so a real EOS is never dropped from the loss.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from llm_lightning.errors import TokenizerError


class Tokenizer(ABC):
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool
    chat_template: str | None = None
    #: End-of-turn ids the model's files declare beside EOS: Llama-3 Instruct ends its turns with
    #: <|eot_id|> while its EOS is <|end_of_text|>, and lists both as ``eos_token_id``.
    end_of_turn_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a generated answer: EOS and the declared end-of-turn ids."""
        return frozenset((self.eos_id, *self.end_of_turn_ids))

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids; special (control) tokens are left out."""

    @abstractmethod
    def token_to_id(self, piece: str) -> int | None: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of everything that determines the token ids (for adapter provenance)."""

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids for ``text``; special tokens written in it (``<s>``, ``<|im_end|>``) are single ids.
        ``bos=True`` adds BOS for models trained with it, unless the text already opens with it (a
        chat template that writes ``{{ bos_token }}``), so a prompt never gets two."""
        ids = self._encode(text)
        if bos and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list | None = None, chat_template: str | None = None) -> list[int]:
        """Ids of ``messages`` rendered with this tokenizer's chat template (or ``chat_template``):
        the same name, arguments and ids as transformers' ``apply_chat_template``."""
        from llm_lightning.prompts import ChatTemplateError, bind

        if not (chat_template or self.chat_template):
            raise ChatTemplateError(f"{self.source}: the tokenizer has no chat template; pass chat_template=...")
        template = bind("custom", chat_template or self.chat_template, self)
        text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, bos=False)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    @abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @abstractmethod
    def _save_vocabulary(self, directory: Path) -> None:
        """Write the vocabulary file transformers reads (``tokenizer.json`` or ``tokenizer.model``)."""

    def save_hf(self, directory: Path) -> None:
        """This tokenizer in the layout transformers' ``AutoTokenizer`` reads: the vocabulary file
        plus ``tokenizer_config.json`` with the special tokens, BOS rule and chat template."""
        directory.mkdir(parents=True, exist_ok=True)
        self._save_vocabulary(directory)
        token = lambda token_id: None if token_id is None else self.id_to_token(token_id)  # noqa: E731
        settings = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id), "pad_token": token(self.pad_id),
                    "add_bos_token": self.add_bos, "add_eos_token": False, "model_max_length": 1_000_000}
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        settings.update(self._hf_settings())
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))

    def _hf_settings(self) -> dict:
        """Settings transformers needs to tokenize as this class does."""
        return {}

    def _choose_pad(self, declared_pad: int | None, unk_id: int | None) -> int:
        for candidate in (declared_pad, unk_id, 0):
            if candidate is not None and candidate >= 0 and candidate != self.eos_id:
                return candidate
        return self.vocab_size - 1


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces whose concatenation equals ``decode(all)``.

    It re-decodes a short window that starts one emitted chunk back, so SentencePiece's rule of
    dropping the leading space of the first piece applies to both halves of the comparison, and
    it holds back text that ends in an incomplete UTF-8 sequence (byte-fallback tokens).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (possibly ending in a replacement character)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2 ``tokenizer.model`` files, and SentencePiece vocabularies rebuilt from GGUF."""

    def __init__(self, model_proto: bytes, source: str, add_bos: bool = True) -> None:
        import sentencepiece

        self.source = source
        self._proto = model_proto
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises bare RuntimeError/OSError
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({exc})") from None
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        self.bos_id = bos if bos >= 0 else None
        if eos < 0:
            raise TokenizerError(f"{source}: SentencePiece model defines no EOS token")
        self.eos_id = eos
        self.add_bos = add_bos
        unk = self.sp.unk_id()
        self.pad_id = self._choose_pad(self.sp.pad_id(), unk if unk >= 0 else None)
        # SentencePiece reads "<s>" in text as three characters; transformers reads it as BOS, and
        # chat templates write it so: split such pieces out first, as transformers does.
        specials = sorted((self.sp.id_to_piece(i) for i in range(self.sp.vocab_size())
                           if self.sp.is_control(i) or self.sp.is_unknown(i)), key=len, reverse=True)
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @classmethod
    def from_file(cls, path: str | Path, chat_template: str | None = None) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        tokenizer = cls(path.read_bytes(), str(path))
        tokenizer.chat_template = chat_template
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def _encode(self, text: str) -> list[int]:
        if self._specials is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        for index, part in enumerate(self._specials.split(text)):
            if index % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        return token_id if self.sp.id_to_piece(token_id) == piece else None

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def _save_vocabulary(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self._proto)

    def _hf_settings(self) -> dict:
        # legacy: text after a special token starts a word, as SentencePiece (and Meta) encode it
        return {"tokenizer_class": "LlamaTokenizer", "legacy": True}

    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``, or BPE vocabularies from GGUF)."""

    def __init__(self, tokenizer, source: str, *, bos_id: int | None, eos_id: int,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = True,
                 chat_template: str | None = None, end_of_turn_ids: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.source = source
        self.bos_id, self.eos_id = bos_id, eos_id
        # A declared id that names no token (a config.json written for a larger vocabulary) could
        # never be sampled, and would index past the logits when min_new_tokens masks the stop ids.
        self.end_of_turn_ids = tuple(sorted({int(i) for i in end_of_turn_ids if 0 <= i < self.vocab_size} - {eos_id}))
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.pad_id = self._choose_pad(pad_id, unk_id)

    @classmethod
    def from_directory(cls, directory: str | Path) -> HFTokenizer:
        """``tokenizer.json`` plus the special-token ids from ``tokenizer_config.json``/``config.json``."""
        from tokenizers import Tokenizer as RawTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as exc:
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc})") from None
        settings = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")

        def special_id(name: str) -> int | None:
            token = settings.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and raw.token_to_id(token) is not None:
                return raw.token_to_id(token)
            return next(iter(_as_list(model_config.get(f"{name}_token_id"))), None)

        bos_id, eos_id = special_id("bos"), special_id("eos")
        if eos_id is None:
            raise TokenizerError(f"{directory}: no eos_token in tokenizer_config.json or config.json")
        probe = raw.encode("a", add_special_tokens=True).ids
        add_bos = settings.get("add_bos_token", bool(probe) and probe[0] == bos_id)
        # transformers' generate stops on every id these list; so does ours.
        declared = [ids for config in (model_config, _read_json(directory / "generation_config.json"))
                    for ids in _as_list(config.get("eos_token_id"))]
        return cls(raw, str(path), bos_id=bos_id, eos_id=eos_id, pad_id=special_id("pad"),
                   unk_id=special_id("unk"), add_bos=add_bos, chat_template=settings.get("chat_template"),
                   end_of_turn_ids=declared)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def _save_vocabulary(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()


def _as_list(value) -> list[int]:
    """An ``eos_token_id`` setting, which files write as one id, a list of ids, or null."""
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.model`` file, a ``tokenizer.json`` file, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_directory(path)
        if (path / "tokenizer.model").is_file():
            chat_template = _read_json(path / "tokenizer_config.json").get("chat_template")
            return SentencePieceTokenizer.from_file(path / "tokenizer.model", chat_template=chat_template)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.name.endswith(".json"):
        return HFTokenizer.from_directory(path.parent)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    head = path.read_bytes()[:64]
    if head[:1].isalnum() and b" " in head and b"\n" in head:
        raise TokenizerError(
            f"{path}: looks like a LLaMA-3 tiktoken file, which is not supported; "
            "point at the model's Hugging Face tokenizer.json instead"
        )
    return SentencePieceTokenizer.from_file(path)
