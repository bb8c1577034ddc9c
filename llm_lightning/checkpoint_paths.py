"""``ckpt_path``: one meaning in every tool.

- ``last``: the newest ``last.ckpt`` among the runs in scope: in ``train.py`` the earlier runs of
  the same experiment name (and sweep job); in generate, evaluate and export the runs under
  ``outputs/<name>`` (``name=...``), or under ``outputs/`` when no name is given;
- a run directory (``outputs/<name>/<time>``): its ``checkpoints/last.ckpt``;
- a checkpoint file, or a PEFT adapter directory (``adapter_config.json``): itself.
"""

from __future__ import annotations

from pathlib import Path

from llm_lightning.errors import CheckpointError

RUNS = Path("outputs")
LAST = Path("checkpoints") / "last.ckpt"


def newest_last_checkpoint(root: Path, pattern: str) -> Path:
    candidates = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"ckpt_path=last: no {pattern} under {root}; train first (python train.py)")
    return candidates[-1]


def resolve_checkpoint(value: str, *, name: str | None = None, root: Path | None = None,
                       pattern: str | None = None) -> Path:
    """The checkpoint ``value`` names; ``root``/``pattern`` scope ``last`` (default: ``outputs/<name or *>``)."""
    if value == "last":
        if root is None:
            root, pattern = (RUNS / name, f"*/{LAST}") if name else (RUNS, f"*/*/{LAST}")
        return newest_last_checkpoint(root, pattern or f"*/{LAST}")
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return path
        if (path / LAST).is_file():
            return path / LAST
        raise CheckpointError(f"ckpt_path={value}: a directory without {LAST} or adapter_config.json; "
                              "expected a run dir, a .ckpt file, a PEFT adapter dir, or last")
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={value}: no such checkpoint file")
    return path
