"""Reading ``.pth``/``.bin`` files without ever running pickled code, and ``.safetensors`` files."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from llm_lightning.errors import CheckpointError


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (memory-mapped when the file is a zip archive).

    A file that pickles anything other than tensors and plain containers is refused before
    any of its code can run.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unsupported object"
        raise CheckpointError(
            f"{path}: refused to load, the file pickles objects other than tensors ({reason[:200]})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError for damaged files
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint, truncated or corrupt? ({first_line[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file, truncated or corrupt? ({exc})") from None
