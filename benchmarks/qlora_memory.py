"""Measured training memory and speed of LoRA, QLoRA (NF4 base), DoRA and both, against the dry run's estimate.

    python benchmarks/qlora_memory.py                      # the embedded SmolLM2-135M, CPU, fp32, 4 x 256 tokens
    python benchmarks/qlora_memory.py --preset llama2-7b --device cuda --precision bf16-mixed --targets all \\
        --batch 4 --seq-len 512 --checkpointing          # the 7B shape with random weights, on a GPU

Each variant runs in a fresh process. What is measured is what the dry run estimates: the weights
(after any quantization), the adapters' gradients and AdamW state, and the peak of three training
steps at a full batch (every row ``--seq-len`` tokens, the worst case the dry run sizes). On CUDA
that is ``max_memory_allocated``; on CPU it is the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs once the model is built, so loading's transient copies are left
out) less its resident set before the weights were loaded. The third step is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ab_rounds import machine
from memory_curve import rss_bytes
from train_throughput import base_model, ours, step_time
from llm_lightning.dry_run import estimate
from llm_lightning.lora import LoRAConfig
from llm_lightning.precision import Precision

VARIANTS = {"lora": {}, "qlora": {"base_quant": "nf4"}, "dora": {"dora": True},
            "qlora+dora": {"base_quant": "nf4", "dora": True}}


def measure(args) -> dict:
    lora = replace(LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=args.dropout,
                              targets=tuple(args.targets.split(","))), **VARIANTS[args.child])
    precision = Precision.parse(args.precision)
    args.dtype = str(precision.frozen_dtype(lora.base_quant is not None)).removeprefix("torch.")
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    model, loss = ours(base_model(args), lora)
    model.activation_checkpointing = args.checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if precision.name == "bf16-mixed" \
        else contextlib.nullcontext()
    with autocast:
        for _ in range(2):
            step_time(model, loss, optimizer, (ids, ids), args.device)
        seconds = step_time(model, loss, optimizer, (ids, ids), args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
    estimated = estimate(model.config, lora, precision=precision, batch_size=args.batch, seq_len=args.seq_len,
                         checkpointing=args.checkpointing, device_type="cuda" if cuda else "cpu")
    estimated_gib = sum(estimated["memory"].values()) / 2**30
    measured_gib = (peak - before) / 2**30
    return {"variant": args.child, "measured_gib": round(measured_gib, 3), "estimated_gib": round(estimated_gib, 3),
            "estimate_error": round(estimated_gib / measured_gib - 1, 3),
            "tokens_per_sec": round(args.batch * args.seq_len / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a preset with random weights (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="wq,wv")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", default="qlora_memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    report = machine(args.device)
    rows = []
    for variant in args.variants.split(","):
        child = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                    else {"variant": variant, "error": done.stderr.strip().splitlines()[-1]})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.output, "w") as handle:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "child"}, "machine": report,
                   "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
