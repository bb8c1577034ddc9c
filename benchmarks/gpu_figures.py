"""The GPU figures the README reports: LoRA training throughput, MFU and peak memory at the LLaMA-2-7B
shape, and batch-1 decode against the HBM bound. One script, run once when a GPU is lent.

    python benchmarks/gpu_figures.py                         # LLaMA-2-7B shape, random bf16 weights
    python benchmarks/gpu_figures.py --preset tiny --device cpu --steps 2 --decode-tokens 8   # a smoke run

Training: a bf16 base with fp32 LoRA r16 on every block layer and fp32 AdamW (what ``bf16-true``
trains), activation checkpointing on, our fused loss, at batch 4 x 512 and batch 1 x 2048.
MFU counts per token 4N + 12·L·d·T FLOPs (forward 2N, backward through the frozen weights 2N with no
weight gradients, attention 4·L·d·T forward and 8·L·d·T backward), N the matrix parameters, against
the GPU's dense bf16 peak. The LoRA model, loss and timed step are ``train_throughput.py``'s.
Decode: batch 1, greedy, ``compile=True`` (CUDA graphs), 128 new tokens; its bound is the weight
bytes read per token divided by the HBM bandwidth.

The model takes the embedded tokenizer's 49,152-token vocabulary (LLaMA-2 has 32,000) so that
``generate`` can run without other files: 0.14B more parameters, counted in N and in the bytes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.generation import generate
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import LoRAConfig
from train_throughput import matmul_parameters, ours, step_time

#: Dense bf16 peak FLOP/s and HBM bytes/s by the name CUDA reports (vendor datasheets, SXM parts).
GPUS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def gpu_limits(device: str) -> tuple[float | None, float | None]:
    if not device.startswith("cuda"):
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((limits for key, limits in GPUS.items() if key in name), (None, None))


def build(args):
    """The model (bf16 base, fp32 adapters, as ``train_throughput.ours`` adapts it) and its loss."""
    torch.manual_seed(0)
    config = LLaMAConfig.from_name(args.preset, vocab_size=embedded_tokenizer().vocab_size)
    with torch.device(args.device):
        model = LLaMA(config).to(torch.bfloat16)
    return ours(model, LoRAConfig(r=16, alpha=32, dropout=0.0, targets=("all",)))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training(model: LLaMA, loss, args, batch: int, seq_len: int, peak_flops: float | None) -> dict:
    model.train()
    model.activation_checkpointing = True
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [step_time(model, loss, optimizer, (ids, ids), args.device) for _ in range(args.warmup + args.steps)]
    seconds = sorted(times[args.warmup:])[args.steps // 2]
    config = model.config
    flops_per_token = 4 * matmul_parameters(model) + 12 * config.n_layers * config.dim * seq_len
    tokens_per_second = batch * seq_len / seconds
    return {
        "batch": batch, "seq_len": seq_len, "tokens_per_second": round(tokens_per_second, 1),
        "mfu": round(tokens_per_second * flops_per_token / peak_flops, 4) if peak_flops else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None,
        "median_step_seconds": round(seconds, 4),
    }


def decode(model: LLaMA, args, bandwidth: float | None) -> dict:
    model.eval()
    tokenizer = embedded_tokenizer()
    prompt = "Give three tips for staying healthy."
    compile = args.device.startswith("cuda")
    options = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, compile=compile)
    generate(model, tokenizer, prompt, **options)  # compiles, captures the CUDA graphs
    synchronize(args.device)
    start = time.perf_counter()
    generate(model, tokenizer, prompt, **options)
    synchronize(args.device)
    tokens_per_second = args.decode_tokens / (time.perf_counter() - start)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth / weight_bytes if bandwidth else None
    return {"new_tokens": args.decode_tokens, "compile": compile, "tokens_per_second": round(tokens_per_second, 1),
            "hbm_bound_tokens_per_second": round(bound, 1) if bound else None,
            "fraction_of_hbm_bound": round(tokens_per_second / bound, 3) if bound else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per shape (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--output", default="gpu_figures.json")
    args = parser.parse_args()
    peak_flops, bandwidth = gpu_limits(args.device)
    model, loss = build(args)
    result = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__, "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
        "training": [training(model, loss, args, 4, 512, peak_flops), training(model, loss, args, 1, 2048, peak_flops)],
        "decode": decode(model, args, bandwidth),
    }
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
