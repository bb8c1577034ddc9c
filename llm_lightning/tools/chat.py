"""``python generate.py chat=true``: a conversation, one user turn per input line.

Each reply streams as it decodes and ends at the template's end-of-turn token; the whole history
is sent every turn through the same chat template training used. Commands: ``/reset`` forgets the
conversation, ``/system <text>`` starts a new one under that system message (``/system`` alone
goes back to the template's default), ``/exit`` (or end of input) ends. When the history no longer
leaves room for ``max_new_tokens`` in the model's context, the oldest exchanges are dropped.
Replies go to stdout and everything else to stderr, so a pipe carries only the conversation.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from llm_lightning.generation import stream
from llm_lightning.model import LLaMA
from llm_lightning.prompts import ChatTemplate
from llm_lightning.tokenizer import Tokenizer

HELP = "[chat: one message per line; /reset forgets the conversation, /system <text> sets the system message, /exit ends]"


def _fit(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, room: int) -> list[dict]:
    """``messages`` without their oldest exchanges, until the prompt fits in ``room`` tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(tokenizer.encode(template.prompt(system + turns), bos=True)) > room:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return system + turns


def chat(model: LLaMA, tokenizer: Tokenizer, template: ChatTemplate, lines: Iterable[str], *, system: str | None = None,
         out: TextIO = sys.stdout, log: TextIO = sys.stderr, **sampling) -> list[dict]:
    """Run the conversation; returns each turn as ``{"messages": [...sent...], "reply": "..."}``."""
    transcript: list[dict] = []
    history: list[dict] = []
    print(HELP, file=log, flush=True)
    for line in lines:
        text = line.rstrip("\r\n")
        command, _, argument = text.partition(" ")
        if not text.strip():
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            print("[conversation cleared]", file=log, flush=True)
            continue
        if command == "/system":
            system, history = argument.strip() or None, []
            print(f"[new conversation, system message: {system or 'the template default'}]", file=log, flush=True)
            continue
        if command.startswith("/"):
            print(f"[unknown command {command}; {HELP[7:]}", file=log, flush=True)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        room = model.config.max_seq_len - sampling.get("max_new_tokens", 128)
        fitted = _fit(messages, template, tokenizer, room)
        if len(fitted) < len(messages):
            print(f"[dropped the {len(messages) - len(fitted)} oldest messages to fit the context]", file=log)
            history = fitted[1:] if system else fitted
        pieces = []
        for piece in stream(model, tokenizer, template.prompt(fitted), **sampling):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        out.flush()
        reply = "".join(pieces)
        history.append({"role": "assistant", "content": reply})
        transcript.append({"messages": fitted, "reply": reply})
    return transcript
