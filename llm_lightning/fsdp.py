"""``trainer=fsdp``: FSDP2 for LoRA on a frozen base, through Lightning's ``ModelParallelStrategy``.

Why FSDP2 (``fully_shard``) rather than Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens each
unit's parameters into one buffer of one dtype, so under ``bf16-true`` a block's fp32 LoRA tensors
became bf16 with its base, and AdamW's moments with them. FSDP2 shards every parameter on its own
(a DTensor) and keeps its dtype: bf16 base shards, fp32 adapter shards, fp32 gradients (only the
adapters have any) and fp32 AdamW state, as ``precision.py`` keeps them on one device.

Each ``TransformerBlock`` is one unit, gathered for its forward and freed after it (and again for
the backward). The root unit (embeddings, final norm, head) stays gathered from its forward to
the end of the backward: the fused loss reads the head weight after ``hidden_states`` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from llm_lightning.model import LLaMA


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: LLaMA, world_size: int, device_type: str) -> None:
    """Shard ``model`` in place over all ``world_size`` ranks (full sharding, one flat mesh)."""
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # Training, scoring and a prompt's sampling call hidden_states (then the head), decoding calls forward:
    # both gather the root.
    register_fsdp_forward_method(model, "hidden_states")


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on every rank (a collective for a shard), on the CPU."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().cpu()


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with data parallelism only, whose checkpoints gather just the
    trained tensors: the LightningModule's ``is_checkpointed`` ones (a few MB), never the base
    (13 GB for a 7B model in bf16), which ``on_save_checkpoint`` would drop anyway."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        return {name: gathered(value) for name, value in module.state_dict().items()
                if module.is_checkpointed(name)}

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader puts the saved tensors into the sharded model and leaves them out of
        what it returns; they go back in, so that ``on_load_checkpoint`` checks them as it does
        under every other strategy (the adapter's tensors, a few MB, read once more)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = torch.load(Path(self.broadcast(checkpoint_path)), map_location="cpu", mmap=True, weights_only=True)
        checkpoint["state_dict"] = saved["state_dict"]
        return checkpoint
