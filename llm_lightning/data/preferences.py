"""Preference records as pairs: one prompt (a conversation ending in a user turn) and two answers.

- ``sharegpt``: ``{"conversations": [...history ending with a human turn], "chosen": {"from": "gpt",
  "value": ...}, "rejected": {...}}`` (the answers may also be plain strings), as LLaMA-Factory's
  ``dpo_en_demo.json``;
- ``flat``: ``{"prompt", "chosen", "rejected"}``, each a string (a user turn, an assistant turn)
  or a list of OpenAI messages, as TRL's preference datasets; an answer given as messages is its
  last assistant message;
- ``alpaca``: ``{"instruction", "input", "chosen", "rejected"}`` strings, a single-turn instruction;
- ``auto``: whichever the first record's keys name.

Any record may carry a numeric ``margin``: how much better the chosen answer is (Llama 2's reward
model adds it inside the Bradley-Terry loss; ``reward_model.py``). DPO ignores it.

A bad record is refused with the file, the record's index and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from llm_lightning.data.conversations import (Conversation, RecordError, format_by_keys, from_messages,
                                              from_sharegpt, parse_records)
from llm_lightning.errors import DataError
from llm_lightning.prompts import user_message

PREFERENCE_FORMATS = ("auto", "sharegpt", "flat", "alpaca")


@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # ends with a user turn
    chosen: str
    rejected: str
    margin: float | None = None  # the record's own, for the reward model's loss

    def with_answer(self, answer: str) -> Conversation:
        """The prompt followed by ``answer`` as the assistant's turn."""
        return Conversation((*self.prompt.messages, {"role": "assistant", "content": answer}), self.prompt.tools,
                            format=self.prompt.format)


def _answer(row: dict, key: str) -> str:
    """An answer given as a string, a ShareGPT turn, or a list of messages (its last assistant one)."""
    if key not in row:
        raise RecordError(f"lacks field {key!r}")
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        if value.get("from", "gpt") != "gpt":
            raise RecordError(f"field '{key}.from' is {value['from']!r}, expected 'gpt'")
        return value["value"]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        if value.get("role", "assistant") != "assistant":
            raise RecordError(f"field '{key}.role' is {value['role']!r}, expected 'assistant'")
        return value["content"]
    if isinstance(value, list) and value:
        last = value[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    raise RecordError(f"field {key!r} is a {type(value).__name__}; expected a string, a {{from, value}} turn or "
                      "a list of messages ending with an assistant one")


def _ends_with_user(prompt: Conversation) -> Conversation:
    if prompt.messages[-1]["role"] != "user":
        raise RecordError(f"prompt ends with a {prompt.messages[-1]['role']} turn, expected a user turn to answer")
    return prompt


def from_sharegpt_pair(row: dict) -> PreferencePair:
    return PreferencePair(_ends_with_user(from_sharegpt(row)), _answer(row, "chosen"), _answer(row, "rejected"))


def prompt_conversation(row: dict) -> Conversation:
    """A record's ``prompt``: a string (one user turn) or a list of OpenAI messages (with ``tools``)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return Conversation(({"role": "user", "content": prompt},), format="messages")
    if isinstance(prompt, list):
        try:
            return from_messages({"messages": prompt, "tools": row.get("tools")})
        except RecordError as exc:
            raise RecordError(str(exc).replace("'messages", "'prompt")) from None
    raise RecordError(f"field 'prompt' is a {type(prompt).__name__}, expected a string or a list of messages")


def from_flat(row: dict) -> PreferencePair:
    return PreferencePair(_ends_with_user(prompt_conversation(row)), _answer(row, "chosen"), _answer(row, "rejected"))


def from_alpaca_pair(row: dict) -> PreferencePair:
    fields = {}
    for key in ("instruction", "input"):
        value = row.get(key, "")
        if not isinstance(value, str):
            raise RecordError(f"field {key!r} is a {type(value).__name__}, expected a string")
        fields[key] = value
    prompt = Conversation((user_message(fields["instruction"], fields["input"]),), format="alpaca")
    return PreferencePair(prompt, _answer(row, "chosen"), _answer(row, "rejected"))


PARSERS = {"sharegpt": from_sharegpt_pair, "flat": from_flat, "alpaca": from_alpaca_pair}


def detect_preference_format(row: Any, source: str) -> str:
    return format_by_keys(row, source, (("conversations", "sharegpt"), ("prompt", "flat"), ("instruction", "alpaca")),
                          "preference pairs with 'conversations' (ShareGPT), 'prompt' or 'instruction', plus "
                          "'chosen' and 'rejected'")


def to_pairs(rows: list, source: str, *, format: str = "auto",
             skip_invalid: bool = False) -> tuple[list[PreferencePair], int]:
    """(pairs, number skipped) from parsed JSON rows."""
    if format not in PREFERENCE_FORMATS:
        raise DataError(f"data.format={format}: expected one of {', '.join(PREFERENCE_FORMATS)} for preference data")
    if format == "auto":
        format = detect_preference_format(rows[0], source) if rows else "flat"

    def parse(row: dict) -> PreferencePair:
        pair = PARSERS[format](row)
        if pair.chosen == pair.rejected:
            raise RecordError("has the same text for 'chosen' and 'rejected'")
        margin = row.get("margin")
        if margin is None:
            return pair
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise RecordError(f"field 'margin' is {margin!r}, expected a finite number")
        return replace(pair, margin=float(margin))

    return parse_records(rows, source, parse, kind=f"{format} preference format", skip_invalid=skip_invalid)
