"""Prompts for ``generate.py prompts_file=...``: a text file with one per line, or an Alpaca JSON list."""

from __future__ import annotations

from pathlib import Path

from llm_lightning.data.records import DataError, read_records


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(instruction, input) pairs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl") or text.lstrip().startswith("["):
        records, _ = read_records(path)
        return [(r.instruction, r.input) for r in records]
    prompts = [(line, "") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (expected one per line)")
    return prompts


__all__ = ["read_prompts"]
