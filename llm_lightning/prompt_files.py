"""Prompts for ``generate.py prompts_file=...``: a text file with one per line, or a JSON/JSONL file
of Alpaca records or conversations (``messages``/ShareGPT; a conversation is continued after its
last user turn, and an assistant answer in the file is left out)."""

from __future__ import annotations

from pathlib import Path

from llm_lightning.data.conversations import Conversation
from llm_lightning.data.records import read_records
from llm_lightning.errors import DataError
from llm_lightning.prompts import user_message


def read_prompts(path: str | Path) -> list[Conversation]:
    """Each prompt as a conversation whose messages end where the model should answer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl") or text.lstrip().startswith(("[", "{")):
        records, _ = read_records(path, need_answer=False)
        return [Conversation(tuple(r.prompt), r.tools, r.format) for r in records]
    prompts = [Conversation((user_message(line),)) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (expected one per line)")
    return prompts
