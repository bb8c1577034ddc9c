"""``dry_run=true``: size a run without reading weights.

The model is built on the meta device (no memory), LoRA is applied, and the table shows exact
parameter counts and an estimate of training memory for the chosen precision, batch and
sequence length. The activation estimate counts the tensors autograd keeps per token and layer
for a LoRA run with a frozen base (the two norms' inputs, q/k/v, attention's output, three FFN
intermediates, and each adapter's input, rank-r intermediate and one-byte dropout mask: what a
saved-tensors hook counts in a real step, to 0.3%),
plus the fused head + loss's fp32 chunk of logits, counted twice (``linear_cross_entropy``:
never the full logits; with oneDNN's products a
chunk's fresh logits appear while the last chunk's are still held) and the hidden-state gradient it keeps;
with activation checkpointing only block inputs are kept, plus one block recomputed at a time.

Under ``trainer=fsdp`` (``shards`` ranks, ``fsdp.py``) each rank holds 1/shards of every weight,
gradient and optimizer state, and gathers whole: the root (embeddings, final norm, head) from the
forward to the end of the backward, and one block at a time plus the next one, prefetched.

A QLoRA base (``base_quant=nf4``) stores the blocks' linear weights at ``nf4.bytes_per_weight()``
and dequantizes one matrix at a time, in the compute dtype, for its product (the largest is
counted, once). DoRA keeps each adapted layer's output before its rescaling (for the magnitude's
gradient) and takes the row norms of one fp32 weight at a time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from llm_lightning.config import LLaMAConfig
from llm_lightning.linear_cross_entropy import CHUNK_BYTES
from llm_lightning import nf4
from llm_lightning.lora import LoRAConfig, apply_lora, count_parameters
from llm_lightning.precision import Precision
from llm_lightning.model import LLaMA

GIB = 2**30


def _activation_bytes(config: LLaMAConfig, lora: LoRAConfig, *, tokens: int, act_bytes: int,
                      checkpointing: bool, device_type: str) -> float:
    d, kv, ffn = config.dim, config.kv_heads * config.head_dim, config.ffn_hidden_dim
    inputs = {"wq": d, "wk": d, "wv": d, "wo": d, "w1": d, "w2": ffn, "w3": d}
    outputs = {"wq": d, "wk": kv, "wv": kv, "wo": d, "w1": ffn, "w2": d, "w3": ffn}
    adapted = [t for t in lora.targets if t in inputs]
    # the two norms' inputs; q, k, v and attention's output; the gate, the up projection and the gate's silu
    frozen_path = 4 * d + 2 * kv + 3 * ffn
    # each adapter keeps its input (its own dropped-out copy, or one shared by the adapters that
    # read the same tensor) and its rank-r intermediate; DoRA its output too
    reads = {"wq": "x", "wk": "x", "wv": "x", "wo": "attention", "w1": "h", "w3": "h", "w2": "gated"}
    own_inputs = sum(inputs[t] for t in adapted)
    # Without dropout wo reads attention's output itself (SDPA returns it laid out so that the
    # reshape is a view), which the frozen path already counts.
    shared = {reads[t]: inputs[t] for t in adapted if reads[t] != "attention"}
    kept_inputs = own_inputs if lora.dropout > 0 else sum(shared.values())
    adapters = kept_inputs + sum(lora.r + (outputs[t] if lora.dora else 0) for t in adapted)
    masks = own_inputs if lora.dropout > 0 else 0  # bool: one byte each
    per_layer = (frozen_path + adapters) * act_bytes + masks
    if checkpointing:
        blocks = config.n_layers * d * act_bytes + per_layer
    else:
        blocks = config.n_layers * per_layer
    head_and_loss = 2 * min(tokens * config.vocab_size * 4, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]))
    return tokens * (blocks + d * act_bytes) + head_and_loss


def _parameter_bytes(module: torch.nn.Module, frozen_bytes: int) -> int:
    """A module's weights as training holds them: frozen ones in ``frozen_bytes``, trainable in fp32."""
    return sum(p.numel() * (4 if p.requires_grad else frozen_bytes) for p in module.parameters())


def estimate(config: LLaMAConfig, lora: LoRAConfig, *, precision: Precision, batch_size: int, seq_len: int,
             checkpointing: bool, device_type: str = "cuda", shards: int = 1) -> dict[str, Any]:
    with torch.device("meta"):
        model = LLaMA(config)
    quantized = sum(m.weight.numel() for _, m in nf4.quantized_layers(model)) if lora.base_quant else 0
    apply_lora(model, replace(lora, base_quant=None))  # the meta device holds no values to quantize
    trainable, total = count_parameters(model)
    base = total - trainable
    # The token embeddings keep weights_dtype; the rest of the base is loaded in frozen_dtype (precision.py).
    embedding = config.vocab_size * config.dim
    frozen_bytes = precision.frozen_dtype(lora.base_quant is not None).itemsize
    act_bytes = precision.activation_bytes
    largest_matrix = config.dim * max(config.ffn_hidden_dim, config.dim)
    memory = {
        "weights": (quantized * nf4.bytes_per_weight() + embedding * precision.weights_dtype.itemsize
                    + (base - quantized - embedding) * frozen_bytes + trainable * 4),
        "gradients": trainable * 4,
        "optimizer (AdamW)": trainable * 8,
        "activations": _activation_bytes(config, lora, tokens=batch_size * seq_len, act_bytes=act_bytes,
                                         checkpointing=checkpointing, device_type=device_type),
    }
    if shards > 1:
        for what in ("weights", "gradients", "optimizer (AdamW)"):
            memory[what] /= shards
        blocks = 2 * _parameter_bytes(model.layers[0], frozen_bytes)
        root = (embedding * precision.weights_dtype.itemsize
                + _parameter_bytes(model, frozen_bytes) - _parameter_bytes(model.layers, frozen_bytes)
                - embedding * frozen_bytes)
        memory["gathered (FSDP)"] = blocks + root
    if lora.base_quant or lora.dora:
        # the product's dequantized weight, and DoRA's fp32 one for its row norms
        memory["dequantized matrix"] = largest_matrix * ((act_bytes if lora.base_quant else 0) + (4 if lora.dora else 0))
    return {"base": base, "trainable": trainable, "total": total, "memory": memory, "device": device_type,
            "shards": shards}


def format_report(name: str, lora: LoRAConfig, result: dict[str, Any], *, precision: Precision, batch_size: int,
                  seq_len: int, checkpointing: bool) -> str:
    shards = result.get("shards", 1)
    per_rank = f" per rank of {shards} (FSDP)" if shards > 1 else ""
    rows = [
        f"dry run: {name}, {'DoRA' if lora.dora else 'LoRA'} r={lora.r} alpha={lora.alpha:g} on "
        f"{', '.join(lora.targets)}{', NF4 base (QLoRA)' if lora.base_quant else ''}",
        f"  base parameters       {result['base']:>18,}",
        f"  trainable parameters  {result['trainable']:>18,}  ({result['trainable'] / result['base']:.2%} of base)",
        f"  total parameters      {result['total']:>18,}",
        f"  estimated {result['device']} memory{per_rank} at precision {precision}, batch {batch_size} x {seq_len} "
        f"tokens, activation checkpointing {'on' if checkpointing else 'off'}:",
    ]
    for what, size in result["memory"].items():
        rows.append(f"    {what:<20} {size / GIB:>10.2f} GiB")
    rows.append(f"    {'total':<20} {sum(result['memory'].values()) / GIB:>10.2f} GiB")
    return "\n".join(rows)
