"""Training records of every supported format as one thing: a conversation.

- ``alpaca``: ``{"instruction", "input", "output"}`` strings, one user turn and one answer;
- ``messages``: OpenAI chat, ``{"messages": [{"role", "content"}, ...], "tools": [...]}`` with roles
  system/user/assistant/tool (an assistant message with ``tool_calls`` may have no content);
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...], "tools": "<JSON list>"}`` with
  ``from`` = system/human/gpt/function_call/observation (a function call is an assistant turn,
  an observation a tool turn);
- ``auto``: whichever the first record's keys name.

A bad record is refused with the file, the record's index and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llm_lightning.errors import DataError
from llm_lightning.prompts import user_message

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "tool"}
ALPACA_FIELDS = ("instruction", "input", "output")


class RecordError(ValueError):
    """What is wrong with one record (the caller adds the file and index)."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = field(default=None)
    format: str = "messages"  # the file's format: an Alpaca record defaults to the alpaca template

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """The messages before the last assistant turn (all of them when there is none): what a
        model is asked to continue."""
        answers = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        return list(self.messages[:answers[-1]] if answers else self.messages)

    @property
    def reference(self) -> str:
        """The last assistant turn's text: the answer a sample is compared with."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    @property
    def title(self) -> str:
        """The last user request (with an Alpaca input), for tables of samples."""
        user = next((m for m in reversed(self.prompt) if m["role"] == "user"), {"content": ""})
        if user.get("input"):
            return f"{user['instruction']}\n[input] {user['input']}"
        return user["content"]


def _string(row: dict, key: str) -> str:
    if key not in row:
        raise RecordError(f"lacks field {key!r}")
    if not isinstance(row[key], str):
        raise RecordError(f"field {key!r} is a {type(row[key]).__name__}, expected a string")
    return row[key]


def from_alpaca(row: dict) -> Conversation:
    instruction, input, output = (_string(row, key) for key in ALPACA_FIELDS)
    return Conversation((user_message(instruction, input), {"role": "assistant", "content": output}), format="alpaca")


def _tools(row: dict) -> tuple[dict, ...] | None:
    tools = row.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RecordError(f"field 'tools' is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("field 'tools' must be a list of function schemas (objects)")
    return tuple(tools)


def from_messages(row: dict) -> Conversation:
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RecordError("field 'messages' must be a non-empty list of {role, content} objects")
    messages = []
    for index, turn in enumerate(turns):
        where = f"messages[{index}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            role = turn.get("role") if isinstance(turn, dict) else None
            raise RecordError(f"field '{where}.role' is {role!r}, expected one of {', '.join(ROLES)}")
        content = turn.get("content")
        if content is None and turn.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise RecordError(f"field '{where}.content' is a {type(content).__name__}, expected a string")
        messages.append({**turn, "content": content})
    return Conversation(tuple(messages), _tools(row), format="messages")


def from_sharegpt(row: dict) -> Conversation:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("field 'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"field '{where}.from' is {speaker!r}, expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise RecordError(f"field '{where}.value' is a {type(turn.get('value')).__name__}, expected a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return Conversation(tuple(messages), _tools(row), format="sharegpt")


PARSERS = {"alpaca": from_alpaca, "messages": from_messages, "sharegpt": from_sharegpt}


def format_by_keys(row: Any, source: str, names: tuple[tuple[str, str], ...], expected: str) -> str:
    """The format named by the first of ``names``' (key, format) whose key the first record has."""
    if isinstance(row, dict):
        for key, name in names:
            if key in row:
                return name
    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{source}: record 0 has {keys or 'no keys'}; expected {expected}, or set data.format")


def detect_format(row: Any, source: str) -> str:
    """The format the first record's keys name."""
    names = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"))
    return format_by_keys(row, source, names, "'instruction' (alpaca), 'messages' (OpenAI) or 'conversations' (ShareGPT)")


def to_conversations(rows: list, source: str, *, format: str = "auto", skip_invalid: bool = False,
                     need_answer: bool = True) -> tuple[list[Conversation], int]:
    """(conversations, number skipped) from parsed JSON rows; for training (``need_answer``) each
    must hold an assistant turn to learn from."""
    if format not in FORMATS:
        raise DataError(f"data.format={format}: expected one of {', '.join(FORMATS)}")
    if format == "auto":
        format = detect_format(rows[0], source) if rows else "alpaca"

    def parse(row: dict) -> Conversation:
        conversation = PARSERS[format](row)
        if need_answer and not any(m["role"] == "assistant" for m in conversation.messages):
            raise RecordError("has no assistant turn to learn from")
        return conversation

    return parse_records(rows, source, parse, kind=f"{format} format", skip_invalid=skip_invalid)


def parse_records(rows: list, source: str, parse, *, kind: str, skip_invalid: bool) -> tuple[list, int]:
    """(what ``parse`` makes of each row, number skipped): a bad row is one line naming the file,
    the record's index and (through ``RecordError``) the field, or is skipped and counted."""
    parsed, skipped = [], 0
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise RecordError(f"is a {type(row).__name__}, expected an object")
            parsed.append(parse(row))
        except RecordError as exc:
            if not skip_invalid:
                raise DataError(f"{source}: record {index} {exc} ({kind}; set data.skip_invalid=true "
                                "to skip such records)") from None
            skipped += 1
    return parsed, skipped
