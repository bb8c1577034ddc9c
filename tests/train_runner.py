"""Run ``train.py`` as users do, in a subprocess, with a tiny model and run dirs under a tmp path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A tiny random LLaMA with the SmolLM2 tokenizer, no logger, a few short steps.
TINY = ["model=tiny", "logger=none", "data.max_seq_length=128", "trainer.max_epochs=1"]


def run_train(*overrides: str, run_dir: Path | None = None, check: bool = True,
              env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "WANDB_SILENT": "true", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_tool(tool: str, *overrides: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <tool>.py`` (evaluate, export, generate), or ``python -m <tool>`` for a module
    (``llm_lightning.score``), as users run it, from the repository root."""
    command = ["-m", tool] if tool.startswith("llm_lightning.") else [f"{tool}.py"]
    result = subprocess.run([sys.executable, *command, *overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool}.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
