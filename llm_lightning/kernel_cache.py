"""Speed measurements of ``cpu_kernels``, kept per machine so that every process decides alike.

A measurement near its line can land on either side of it from one process to the next
(oneDNN's fp32 product measured 1.13x to 1.32x MKL's on one 2-core Zen 4 within minutes). Two
processes that chose differently compute in a different order and so differ in the last bits: a
resumed run would no longer equal the run it continues, and the ranks of one DDP run would not
compute alike. So the first process on a machine measures and writes the speed-up here, and every
later process reads it. The key is everything that picks kernels (``cpu_kernels.cpu_description``:
CPU, ISA flags, torch version and capability, threads, the ISA-limiting variables), so an emulated
AVX2 run or another thread count measures on its own. Delete the file to measure again.

The file is ``$LLM_LIGHTNING_CACHE/cpu_kernels.json`` (default ``~/.cache/llm_lightning``). A
process that cannot read or write it measures for itself, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout


def cache_file() -> Path:
    root = os.environ.get("LLM_LIGHTNING_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm_lightning"
    return Path(root) / "cpu_kernels.json"


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_speedup(machine: dict, path_name: str, measure: Callable[[], float]) -> float:
    """The speed-up of kernel path ``path_name`` on ``machine`` (a description of it): from the
    cache, or measured now (under a lock, so that ranks starting together measure once) and kept."""
    key = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
    file, speedup = cache_file(), None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{file}.lock", timeout=120):
            entries = _read(file)
            entry = entries.get(key)
            if not isinstance(entry, dict):
                entry = entries[key] = {"machine": machine}
            cached = entry.get(path_name)
            if isinstance(cached, (int, float)):
                return float(cached)
            speedup = measure()
            entry[path_name] = round(speedup, 4)
            temporary = file.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
            temporary.replace(file)
    except (OSError, Timeout):
        pass  # an unwritable cache: this process decides for itself
    return speedup if speedup is not None else measure()
