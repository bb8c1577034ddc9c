"""Load time, peak RSS and forward-pass throughput of a checkpoint (default: the embedded model).

    python benchmarks/load_and_forward.py [--source PATH] [--batch 1] [--seq-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rss_before = peak_rss_mib()
    start = time.perf_counter()
    from llm_lightning import cpu_kernels, load_pretrained

    model, _ = load_pretrained(args.source)
    load_seconds = time.perf_counter() - start
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"load: {load_seconds:.2f} s, peak RSS {peak_rss_mib():.0f} MiB "
          f"(before loading {rss_before:.0f} MiB; fp32 weights {weights_mib:.0f} MiB)")

    print(cpu_kernels.describe())
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    with torch.inference_mode():
        model(input_ids)  # warm-up
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(input_ids)
            timings.append(time.perf_counter() - start)
    best = min(timings)
    tokens = args.batch * args.seq_len
    print(f"forward: batch {args.batch} x {args.seq_len} tokens, best of {args.repeats}: {best * 1000:.0f} ms, "
          f"{tokens / best:,.0f} tokens/s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
