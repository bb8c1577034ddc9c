"""Time NF4 quantization and dequantization: bitsandbytes (what ``nf4.py`` uses) against torchao's ``NF4Tensor``.

    python benchmarks/nf4_kernels.py                  # CPU; torchao's side runs only where torchao is installed
    python benchmarks/nf4_kernels.py --device cuda

Both store QLoRA's format (block 64, scales double-quantized in blocks of 256). Each matrix is
dequantized ``--repeats`` times per round, the two libraries alternating round by round; the
median milliseconds per dequantization are printed with the mean absolute error on unit Gaussians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ab_rounds import machine
from llm_lightning import nf4

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]


def timed(function, repeats: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def sides(weight: torch.Tensor) -> dict:
    """name -> (quantized, dequantize()) for each library that is installed and takes this shape."""
    quantized = nf4.quantize(weight)
    found = {"bitsandbytes": (quantized, lambda: nf4.dequantize(quantized))}
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        return found
    try:
        theirs = to_nf4(weight, 64, 256)
    except AssertionError as exc:  # its double quantization needs a multiple of 256 scales
        print(f"torchao {tuple(weight.shape)}: {str(exc).strip()}")
        return found
    found["torchao"] = (theirs, theirs.get_original_weight)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="nf4_kernels.json")
    args = parser.parse_args()
    report = machine(args.device)
    rows = []
    for shape in SHAPES:
        weight = torch.randn(*shape, device=args.device)
        libraries = sides(weight)
        times = {name: [] for name in libraries}
        for _ in range(args.rounds):
            for name, (_, dequantize) in libraries.items():
                times[name].append(timed(dequantize, args.repeats, args.device))
        for name, (_, dequantize) in libraries.items():
            error = (dequantize().float() - weight).abs().mean().item()
            rows.append({"library": name, "shape": list(shape), "dequantize_ms": round(statistics.median(times[name]), 3),
                         "mean_abs_error": round(error, 5)})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.output, "w") as handle:
        json.dump({"device": args.device, "machine": report, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
