"""Turn (name, tensor) pairs from any checkpoint format into a LLaMA, checking every name and shape.

The model is built on the meta device and the loaded tensors are assigned in place, so no
second copy of the weights is ever allocated: peak memory stays near the checkpoint's size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llm_lightning.config import LLaMAConfig
from llm_lightning.errors import CheckpointError
from llm_lightning.model import LLaMA


def expected_shapes(config: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LLaMA(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def assemble_model(config: LLaMAConfig, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
                   dtype: torch.dtype, device: torch.device | str) -> LLaMA:
    """A model in eval mode whose every parameter came from ``tensors`` (strict: none missing or extra)."""
    with torch.device("meta"):
        model = LLaMA(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in shapes:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a LLaMA model")
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"but the config (dim={config.dim}, vocab={config.vocab_size}) expects {list(shapes[name])}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(shapes.keys() - state.keys())
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:3])}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
