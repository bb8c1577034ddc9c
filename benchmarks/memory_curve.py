"""Peak training memory against sequence length at a fixed number of tokens per batch, ours vs transformers + PEFT.

    python benchmarks/memory_curve.py                              # the embedded SmolLM2-135M, CPU, fp32
    python benchmarks/memory_curve.py --preset llama2-7b --device cuda --dtype bfloat16 --targets all

Each (side, sequence length) runs in a fresh process: the model is built, the peak is reset, and
two training steps (forward, loss, backward, AdamW) run; the second is timed. On CUDA the peak is
``max_memory_allocated``; on CPU it is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs), so it includes the weights; ``training_gib`` is the peak less what was
held before the first step (activations, the loss, gradients and optimizer state). With tokens per batch fixed, memory that grows
linearly with the sequence stays flat across the rows, and memory that grows quadratically does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from ab_rounds import machine
from train_throughput import base_model, ours, step_time, theirs
from llm_lightning.lora import LoRAConfig


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args) -> dict:
    lora = LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0, targets=tuple(args.targets.split(",")))
    base = base_model(args)
    vocab_size = base.config.vocab_size
    model, loss = (ours if args.child == "ours" else theirs)(base, lora)
    if args.checkpointing:
        if args.child == "ours":
            model.activation_checkpointing = True
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = max(1, args.tokens // args.seq_len)
    ids = torch.randint(0, vocab_size, (batch, args.seq_len), device=args.device)
    if args.device.startswith("cuda"):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # freed heap memory stays resident, so the peak is taken over both steps from here
        before = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    step_time(model, loss, optimizer, (ids, ids), args.device)  # warm-up
    seconds = step_time(model, loss, optimizer, (ids, ids), args.device)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else rss_bytes("VmHWM")
    return {"side": args.child, "batch": batch, "seq_len": args.seq_len, "peak_gib": peak / 2**30,
            "training_gib": (peak - before) / 2**30, "tokens_per_sec": batch * args.seq_len / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch = tokens / seq_len)")
    parser.add_argument("--seq-lens", default="512,1024,2048,4096")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="wq,wv")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    parser.add_argument("--sides", default="ours,transformers+peft")
    parser.add_argument("--output", default="memory_curve.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    report = machine(args.device)
    rows = []
    for seq_len in map(int, args.seq_lens.split(",")):
        for side in args.sides.split(","):
            child = [sys.executable, __file__, "--child", "ours" if side == "ours" else "theirs",
                     "--seq-len", str(seq_len), "--tokens", str(args.tokens), "--device", args.device,
                     "--dtype", args.dtype, "--rank", str(args.rank), "--targets", args.targets]
            child += ["--preset", args.preset] if args.preset else []
            child += ["--checkpointing"] if args.checkpointing else []
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"side": side, "seq_len": seq_len, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "side": side})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.output, "w") as handle:
        json.dump({"device": args.device, "dtype": args.dtype, "tokens_per_batch": args.tokens,
                   "model": args.preset or "smollm2-135m (embedded)", "machine": report, "rows": rows}, handle,
                  indent=2)


if __name__ == "__main__":
    main()
