"""Meta's format: ``params.json`` plus ``consolidated.NN.pth``, one file per model-parallel rank.

Shards are merged by shape alone: a tensor whose shards already have the full shape is
replicated (norms), otherwise it is concatenated along the one dimension that yields the full
shape. That covers LLaMA-2's embedding split along ``dim`` and LLaMA-3's along the vocabulary
without a per-version table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llm_lightning.checkpoints.assemble import assemble_model, expected_shapes
from llm_lightning.checkpoints.torch_files import load_torch_state_dict
from llm_lightning.config import LLaMAConfig, RopeScaling
from llm_lightning.errors import CheckpointError
from llm_lightning.lora import is_lora_parameter
from llm_lightning.model import LLaMA

# Tensors Meta's files carry that are not parameters of the model (precomputed rotary tables).
NON_PARAMETERS = {"rope.freqs"}

# How Meta's reference code splits each parameter across model-parallel ranks (for writing).
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def is_meta_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


def _shard_paths(directory: Path) -> list[Path]:
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{directory}: params.json found but no consolidated.*.pth weight files")
    return shards


def _read_params(directory: Path) -> dict:
    path = directory / "params.json"
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CheckpointError(f"{path}: missing required field(s) {', '.join(missing)}")
    return params


def config_from_params(params: dict, *, name: str, vocab_size: int, tied: bool) -> LLaMAConfig:
    scaled = bool(params.get("use_scaled_rope"))
    theta = float(params.get("rope_theta", 10000.0))
    return LLaMAConfig(
        name=name,
        vocab_size=vocab_size,
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=RopeScaling() if scaled else None,
        max_seq_len=131072 if scaled else (8192 if theta >= 500000 else 4096),
        tie_embeddings=tied,
    )


def _merge(name: str, parts: list[torch.Tensor], shape: tuple[int, ...], source: Path) -> torch.Tensor:
    if all(tuple(p.shape) == shape for p in parts):
        return parts[0]
    for dim in range(len(shape)):
        others_match = all(
            p.shape[:dim] == shape[:dim] and p.shape[dim + 1:] == shape[dim + 1:] for p in parts
        )
        if others_match and sum(p.shape[dim] for p in parts) == shape[dim]:
            return torch.cat(parts, dim=dim)
    raise CheckpointError(
        f"{source}: shards of {name!r} have shapes {[list(p.shape) for p in parts]}, "
        f"which do not combine into the expected {list(shape)}"
    )


def _vocab_size(params: dict, embedding_parts: list[torch.Tensor]) -> int:
    if params.get("vocab_size", -1) > 0:
        return params["vocab_size"]
    if sum(p.shape[1] for p in embedding_parts) == params["dim"]:
        return embedding_parts[0].shape[0]
    return sum(p.shape[0] for p in embedding_parts)


def load_meta_checkpoint(directory: Path, *, dtype: torch.dtype, device: torch.device | str) -> LLaMA:
    params = _read_params(directory)
    shards = [load_torch_state_dict(p) for p in _shard_paths(directory)]
    keys = [k for k in shards[0] if k not in NON_PARAMETERS]
    for path, shard in zip(_shard_paths(directory), shards):
        if set(shard) - NON_PARAMETERS != set(keys):
            raise CheckpointError(f"{path}: holds different tensor names than the first shard")
    if "tok_embeddings.weight" not in keys:
        raise CheckpointError(f"{directory}: no tok_embeddings.weight in consolidated.*.pth")
    vocab_size = _vocab_size(params, [s["tok_embeddings.weight"] for s in shards])
    config = config_from_params(params, name=directory.name, vocab_size=vocab_size,
                                tied="output.weight" not in keys)
    shapes = expected_shapes(config)
    merged = (
        (k, _merge(k, [s[k] for s in shards], shapes[k], directory) if k in shapes else shards[0][k])
        for k in keys
    )
    return assemble_model(config, merged, source=str(directory), dtype=dtype, device=device)


def params_for(config: LLaMAConfig) -> dict:
    """``params.json`` for a config; an FFN width the preset formula cannot produce is encoded
    through ``multiple_of=1`` and an exact ``ffn_dim_multiplier`` so Meta's code reads it back."""
    params = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "n_kv_heads": config.kv_heads, "vocab_size": config.vocab_size,
        "multiple_of": config.multiple_of, "ffn_dim_multiplier": config.ffn_dim_multiplier,
        "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
    }
    formula = LLaMAConfig(**{**config.to_dict(), "hidden_dim": None})
    if formula.ffn_hidden_dim != config.ffn_hidden_dim:
        base = int(2 * (4 * config.dim) / 3)
        params["multiple_of"] = 1
        params["ffn_dim_multiplier"] = (config.ffn_hidden_dim + 0.5) / base
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    return params


def save_meta_checkpoint(model: LLaMA, directory: Path, num_shards: int = 1) -> None:
    """Write ``params.json`` and ``consolidated.NN.pth`` split the way Meta's model-parallel code does
    (base weights only: merge an adapter first to include it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_for(model.config), indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not is_lora_parameter(k)}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, tensor in state.items():
        if tensor.ndim == 1 or num_shards == 1:
            pieces = [tensor] * num_shards
        else:
            dim = 1 if name.endswith(_ROW_PARALLEL) else 0
            if tensor.shape[dim] % num_shards:
                raise CheckpointError(f"{name}: size {tensor.shape[dim]} cannot be split into {num_shards} shards")
            pieces = list(torch.chunk(tensor, num_shards, dim=dim))
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    width = max(2, math.ceil(math.log10(num_shards + 1)))
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:0{width}d}.pth")
