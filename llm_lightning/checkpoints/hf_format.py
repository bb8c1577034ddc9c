"""Hugging Face format: ``config.json`` plus ``model*.safetensors`` or ``pytorch_model*.bin``.

Hugging Face's conversion script permutes the rows of q/k so that rotary embeddings can rotate
the two halves of each head; we use Meta's adjacent-pair layout, so loading undoes that
permutation and saving re-applies it (``permute_qk``, also used for PEFT adapters). Saving writes
``config.json`` + ``model.safetensors``; ``transformers_twin`` builds the same model in
``transformers`` for parity tests and benchmarks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from llm_lightning.checkpoints.assemble import assemble_model
from llm_lightning.checkpoints.torch_files import iter_safetensors, load_torch_state_dict
from llm_lightning.config import LLaMAConfig, RopeScaling
from llm_lightning.errors import CheckpointError
from llm_lightning.lora import is_lora_parameter
from llm_lightning.model import LLaMA

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
# LoRA targets as PEFT names them for a LLaMA (the last part of the HF module name) -> ours.
PEFT_TARGETS = {hf.rsplit(".", 1)[-1]: ours.rsplit(".", 1)[-1] for hf, ours in _LAYER_NAMES.items() if hf.endswith("proj")}
PEFT_TARGETS["lm_head"] = "output"
_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# Buffers that old transformers versions saved next to the weights.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_to_meta_name(name: str) -> str | None:
    match = _LAYER_PATTERN.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    stem, _, leaf = name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{leaf}" if stem in _TOP_NAMES else None


def meta_to_hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        inverse = {v: k for k, v in _LAYER_NAMES.items()}
        return f"model.layers.{parts[1]}.{inverse['.'.join(parts[2:-1])]}.{parts[-1]}"
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    return f"{inverse_top[parts[0]]}.{parts[-1]}"


def permute_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta adjacent-pair rows -> HF half-split rows (what HF's conversion script does)."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_qk(name: str, tensor: torch.Tensor, config: LLaMAConfig, *, to_hf: bool) -> torch.Tensor:
    """``tensor`` with its rows moved between our (Meta) and HF's layout if ``name`` is a q or k
    weight, or the LoRA B of one (``layers.0.attention.wq.weight`` / ``...wq.lora_b``); else unchanged."""
    heads = {"wq": config.n_heads, "wk": config.kv_heads}.get(name.split(".")[-2])
    if heads is None or tensor.ndim != 2 or tensor.shape[0] != heads * config.head_dim:
        return tensor  # a wrong shape is left for the loader's shape check to report
    return permute_to_hf(tensor, heads) if to_hf else permute_from_hf(tensor, heads)


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def config_from_hf(hf: dict, *, name: str, source: Path) -> LLaMAConfig:
    if hf.get("model_type", "llama") not in ("llama", "mistral"):
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not a LLaMA-family model")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported, expected 'silu'")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{source}: head_dim={hf['head_dim']} differs from hidden_size/heads")
    # transformers 5 writes rope settings under rope_parameters; older versions at top level.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                              rope["original_max_position_embeddings"])
    elif rope_type not in ("default", None):
        raise CheckpointError(f"{source}: rope type {rope_type!r} unsupported, expected default or llama3")
    return LLaMAConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads", heads),
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object") from None
            return [directory / f for f in dict.fromkeys(weight_map.values())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"{directory}: no model.safetensors, pytorch_model.bin or an index of their shards"
    )


def _iter_hf_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            for name, tensor in iter_safetensors(path):
                yield path, name, tensor
        else:
            for name, tensor in load_torch_state_dict(path).items():
                yield path, name, tensor


def load_hf_checkpoint(directory: Path, *, dtype: torch.dtype, device: torch.device | str) -> LLaMA:
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text())
        config = config_from_hf(hf, name=directory.name, source=config_path)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: missing required field {exc.args[0]!r}") from None

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for path, name, tensor in _iter_hf_tensors(_weight_files(directory)):
            if _IGNORED.match(name):
                continue
            meta_name = hf_to_meta_name(name)
            if meta_name is None:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for a LLaMA model")
            if meta_name == "output.weight" and config.tie_embeddings:
                continue
            yield meta_name, permute_qk(meta_name, tensor, config, to_hf=False)  # assemble_model checks shapes

    return assemble_model(config, converted(), source=str(directory), dtype=dtype, device=device)


def hf_config(config: LLaMAConfig, *, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    rope: dict = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope = {"rope_theta": config.rope_theta, "rope_type": "llama3", "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_seq_len}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope if config.rope_scaling is not None else None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def hf_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """Base weights (merge LoRA first if it should be included) under HF names, q/k permuted."""
    return {meta_to_hf_name(name): permute_qk(name, tensor, model.config, to_hf=True).detach().contiguous()
            for name, tensor in model.state_dict().items() if not is_lora_parameter(name)}


def save_hf_checkpoint(model: LLaMA, directory: Path, *, bos_id: int | None = None, eos_id: int | None = None,
                       score_head: torch.nn.Linear | None = None, pad_id: int | None = None) -> None:
    """A ``LlamaForCausalLM`` directory; with ``score_head`` (a reward model), a
    ``LlamaForSequenceClassification`` one instead: the trunk, no LM head, the head as ``score``, and
    ``pad_token_id`` = ``pad_id``, from which transformers finds the last non-pad token to score."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.config, bos_id=bos_id, eos_id=eos_id)
    state = hf_state_dict(model)
    if score_head is not None:
        if pad_id is None:
            raise ValueError("a sequence-classification export needs the pad id its scores are read by")
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=1, pad_token_id=pad_id,
                      id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        state.pop("lm_head.weight", None)
        state["score.weight"] = score_head.weight.detach().contiguous()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.cpu() for k, v in state.items()}, directory / "model.safetensors", metadata={"format": "pt"})


def transformers_twin(model: LLaMA):
    """A ``transformers.LlamaForCausalLM`` with the same weights (for parity tests and benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {k: v for k, v in hf_config(model.config).items() if k not in ("architectures", "model_type")}
    weight = model.tok_embeddings.weight
    # Not on the meta device: transformers computes its rotary buffers at construction.
    with torch.device(weight.device):
        twin = LlamaForCausalLM(LlamaConfig(**settings))
    state = hf_state_dict(model)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    twin.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        twin.tie_weights()
    return twin.to(dtype=weight.dtype).eval()
