"""Our LLaMA in Hugging Face terms: ``config.json`` fields and a state dict with HF names and the
q/k row permutation HF's rotary layout expects. Used to save HF checkpoints and to build a
``transformers`` twin of a model for parity tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_lightning.checkpoints.hf_format import meta_to_hf_name, permute_to_hf
from llm_lightning.config import LLaMAConfig
from llm_lightning.lora import is_lora_parameter
from llm_lightning.model import LLaMA


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
    config = model.config
    heads = {"wq": config.n_heads, "wk": config.kv_heads}
    state = {}
    for name, tensor in model.state_dict().items():
        if is_lora_parameter(name):
            continue
        layer_kind = name.split(".")[-2]
        if layer_kind in heads:
            tensor = permute_to_hf(tensor, heads[layer_kind])
        state[meta_to_hf_name(name)] = tensor.detach().contiguous()
    return state


def save_hf_checkpoint(model: LLaMA, directory: Path, *, bos_id: int | None = None, eos_id: int | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model.config, bos_id=bos_id, eos_id=eos_id), indent=2))
    save_file({k: v.cpu() for k, v in hf_state_dict(model).items()}, directory / "model.safetensors",
              metadata={"format": "pt"})


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
