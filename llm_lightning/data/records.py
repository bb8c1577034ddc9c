"""Reading training records: a JSON list or JSONL file on disk, or a URL downloaded once to a
cache directory, turned into conversations (``conversations.py`` knows the formats). Every problem
names the file and the record (or line and column) so it can be fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from filelock import FileLock

from llm_lightning.data.conversations import Conversation, to_conversations
from llm_lightning.errors import DataError

BUNDLED_SAMPLE = Path(__file__).with_name("alpaca_sample.json")
# The original 52K Stanford Alpaca data: the documented default for users who are online.
STANFORD_ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "file://"))


def cached_path(url: str, cache_dir: Path) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "data.json"
    return cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def download(url: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """Fetch ``url`` into ``cache_dir`` once, checking its SHA-256 when one is given.

    Every rank of a distributed run reads its data before any process group exists (torchrun and
    SLURM start them together), so the ranks agree through a lock file beside the target: the
    first fetches to a temporary name and renames it into place atomically, and the others wait
    for the lock, then find the file. One fetch per machine (per cache directory)."""
    target = cached_path(url, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_file():
            handle, name = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".part")
            partial = Path(name)
            try:
                with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise DataError(f"{url}: download failed ({exc}); pass a local file with data.path=...") from None
            partial.replace(target)
        if sha256 is not None:
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            if digest != sha256:
                target.unlink()
                raise DataError(f"{url}: downloaded file has SHA-256 {digest}, expected {sha256}; removed it")
    return target


def _parse(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found; expected a JSON list or JSONL file of records") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected a JSON list or JSONL file of records") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and not stripped.startswith("[")):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: invalid JSON on line {number}, column {exc.colno}: {exc.msg}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def read_rows(source: str | Path, *, cache_dir: Path | None = None, sha256: str | None = None) -> tuple[list, str]:
    """(the parsed JSON records, the local file they came from) of a path or URL."""
    source = str(source)
    if is_url(source):
        path = download(source, cache_dir or Path.home() / ".cache" / "llm_lightning", sha256)
    else:
        path = Path(source).expanduser()
    return _parse(path), str(path)


def read_records(source: str | Path, *, format: str = "auto", skip_invalid: bool = False,
                 cache_dir: Path | None = None, sha256: str | None = None,
                 need_answer: bool = True) -> tuple[list[Conversation], int]:
    """(valid records as conversations, number skipped) from a path or URL."""
    rows, path = read_rows(source, cache_dir=cache_dir, sha256=sha256)
    return to_conversations(rows, path, format=format, skip_invalid=skip_invalid, need_answer=need_answer)
