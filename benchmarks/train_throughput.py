"""LoRA training steps: ours vs transformers + PEFT on the same weights, batch, shapes and optimizer.

    python benchmarks/train_throughput.py                          # the embedded SmolLM2-135M, CPU, fp32
    python benchmarks/train_throughput.py --preset llama2-7b --device cuda --dtype bfloat16 --seq-len 2048
    python benchmarks/train_throughput.py --data ../shared/data/alpaca_en_demo.json   # as train.py runs it

By default every position of a random batch is supervised; with ``--data`` the batches are the
ones ``train.py`` builds from that file (``AlpacaDataModule``: Alpaca template, prompt tokens
masked, examples of similar length batched together, each batch right-padded to its longest,
``--seq-len`` the longest kept), the first ``--steps`` of its first epoch, the same for both sides. Each step is forward, next-token cross-entropy (each side's own loss code), backward and an AdamW step over the LoRA tensors
(r=16 on wq/wv, i.e. q_proj/v_proj, by default, with ``conf/lora``'s dropout of 0.05 on each adapter's input, as
``train.py`` trains; ``--dropout 0`` for none); ``--compile`` compiles our blocks as ``train.py
compile=true`` does, in the warm-up step, and leaves theirs eager. The two sides alternate step by step after a
warm-up over every batch that is timed (``ab_rounds``); the timed positions over the timed seconds are
reported as tokens/s, with the median per-step ratio
ours/theirs and its min-max, peak memory (CUDA max allocated
per side, or the process's max RSS on CPU), each side's mean minor page faults per step (memory
mapped and touched anew: on CPU, fresh buffers above glibc's 32 MiB mmap limit) and, on CUDA,
MFU from (4N + 12·L·d·T) FLOPs per token.
The same FLOPs are also set against a matrix product of the model's own shapes timed on this
device (``fraction_of_gemm_bound``): a step can go no faster than its matrix products, so that
fraction says how much either side leaves to gain, where no nominal peak is known (CPUs). The count
is a dense model's, head included at every position, so with ``--data`` ours, which skips the
head at masked positions, can exceed 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import time

import torch

from ab_rounds import alternate, format_ratio, machine, shapes_decided, speed_ratio
from llm_lightning import LLaMA, LLaMAConfig, load_pretrained
from llm_lightning.checkpoints.hf_format import transformers_twin
from llm_lightning.checkpoints.hf_format import PEFT_TARGETS
from llm_lightning.data import AlpacaDataModule
from llm_lightning.data.encoding import IGNORE_INDEX
from llm_lightning.linear import matmul_transposed
from llm_lightning.linear_cross_entropy import LogitsBuffer
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.loss import model_nll

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def base_model(args) -> LLaMA:
    dtype = getattr(torch, args.dtype)
    if args.preset is None:
        return load_pretrained(None, dtype=dtype, device=args.device)[0]
    torch.manual_seed(0)
    with torch.device(args.device):
        return LLaMA(LLaMAConfig.from_name(args.preset)).to(dtype)


def ours(model: LLaMA, lora: LoRAConfig, *, compile: bool = False):
    """Our model and our training loss (``model_nll``, normalised as the LightningModule does);
    with ``compile``, each block compiled in place as ``train.py compile=true`` does."""
    apply_lora(model, lora, lora_dtype=torch.float32)  # fp32 adapters, as training and PEFT keep them
    if compile:
        for block in model.layers:
            block.compile()
    model.train()
    buffer = LogitsBuffer()  # kept from step to step, as the LightningModule keeps it

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, n_tokens = model_nll(model, ids, labels, logits_buffer=buffer)
        return loss_sum / n_tokens

    return model, loss


def theirs(model: LLaMA, lora: LoRAConfig):
    from peft import LoraConfig, get_peft_model

    hf_names = {ours_name: hf for hf, ours_name in PEFT_TARGETS.items()}
    twin = get_peft_model(transformers_twin(model), LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=[hf_names[t] for t in lora.targets]))
    twin.train()
    return twin, lambda ids, labels: twin(input_ids=ids, labels=labels).loss  # transformers' own causal-LM loss


def step_time(model, loss_fn, optimizer, batch: tuple[torch.Tensor, torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_fn(*batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def batches(args, vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) pairs [batch, length]: one random, fully supervised batch of ``--seq-len``,
    or the first ``--steps`` training batches ``train.py`` makes of ``--data``."""
    if args.data is None:
        ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), device=args.device)
        return [(ids, ids)]
    data = AlpacaDataModule(args.data, tokenizer=embedded_tokenizer(), max_seq_length=args.seq_len,
                            batch_size=args.batch, val_size=0)
    data.setup("fit")
    out = [(batch["input_ids"].to(args.device), batch["labels"].to(args.device))
           for batch in itertools.islice(data.train_dataloader(), args.steps)]
    if len(out) < args.steps:
        raise SystemExit(f"error: {args.data} makes {len(out)} batches of {args.batch}; --steps {args.steps} "
                         f"needs as many, expected --steps {len(out)} or less")
    return out


def gemm_flops_per_second(config: LLaMAConfig, tokens: int, dtype: torch.dtype, device: str) -> float:
    """Median rate of [tokens, dim] x [dim, ffn_hidden] products: what this device attains on the
    model's largest matrix shape (through oneDNN where ``linear.py`` uses it, the faster library here)."""
    a = torch.randn(tokens, config.dim, dtype=dtype, device=device)
    b = torch.randn(config.ffn_hidden_dim, config.dim, dtype=dtype, device=device)
    times = []
    for _ in range(12):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        matmul_transposed(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * tokens * config.dim * config.ffn_hidden_dim / statistics.median(times[2:])


def matmul_parameters(model: LLaMA) -> int:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear + (model.tok_embeddings.weight.numel() if model.output is None else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="wq,wv")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (train.py's default: 0.05)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side, alternating (at least 5)")
    parser.add_argument("--data", default=None, help="an Alpaca JSON file: time real, prompt-masked batches")
    parser.add_argument("--compile", action="store_true",
                        help="ours as train.py compile=true runs it (blocks compiled; theirs stays eager)")
    parser.add_argument("--output", default="train_throughput.json")
    args = parser.parse_args()

    lora = LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=args.dropout, targets=tuple(args.targets.split(",")))
    ours_model, ours_forward = ours(base_model(args), lora, compile=args.compile)
    theirs_model, theirs_forward = theirs(base_model(args), lora)
    config = ours_model.config
    sides = {
        "ours": (ours_model, ours_forward),
        "transformers+peft": (theirs_model, theirs_forward),
    }
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, (m, _) in sides.items()}
    data = batches(args, config.vocab_size)
    timed_batches = [data[i % len(data)] for i in range(args.steps)]
    positions = sum(ids.numel() for ids, _ in timed_batches)
    memory: dict[str, float] = {}
    faults: dict[str, list[int]] = {name: [] for name in sides}  # minor page faults of each timed step
    report = machine(args.device)
    for name, (model, forward) in sides.items():  # warm-up: every shape that will be timed, once
        for batch in data:
            step_time(model, forward, optimizers[name], batch, args.device)

    def timed(name: str):
        model, forward = sides[name]

        def step(index: int) -> float:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = step_time(model, forward, optimizers[name], timed_batches[index], args.device)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            memory[name] = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
            return seconds
        return step

    times = alternate({name: timed(name) for name in sides}, args.steps)
    supervised = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in timed_batches)
    mean_length = positions / args.steps / args.batch
    result = {"model": args.preset or "smollm2-135m (embedded)", "device": args.device, "dtype": args.dtype,
              "batch": args.batch, "seq_len": args.seq_len, "lora": f"r{args.rank} on {args.targets}, dropout {args.dropout}",
              "data": args.data or "random ids, all supervised", "ours_compiled": args.compile,
              "machine": {**report, **shapes_decided()},
              "mean_batch_length": mean_length, "supervised_fraction": supervised / positions}
    flops_per_token = 4 * matmul_parameters(ours_model) + 12 * config.n_layers * config.dim * mean_length
    gemm_rate = gemm_flops_per_second(config, args.batch * args.seq_len, getattr(torch, args.dtype), args.device)
    result["gemm_flops_per_sec"] = gemm_rate
    result["gemm_bound_tokens_per_sec"] = gemm_rate / flops_per_token
    for name in sides:
        rate = positions / sum(times[name])
        result[name] = {"median_step_seconds": statistics.median(times[name]), "tokens_per_sec": rate,
                        "supervised_tokens_per_sec": rate * result["supervised_fraction"],
                        "peak_memory_gib": memory[name] if args.device.startswith("cuda") else None,
                        "fraction_of_gemm_bound": flops_per_token * rate / gemm_rate,
                        "mean_page_faults_per_step": statistics.mean(faults[name])}
        if args.device.startswith("cuda"):
            peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in torch.cuda.get_device_name()), None)
            if peak:
                result[name]["mfu"] = flops_per_token * rate / peak
    if not args.device.startswith("cuda"):
        result["process_max_rss_gib"] = max(memory.values())
    result["ratio"] = speed_ratio(times["ours"], times["transformers+peft"])
    print(json.dumps(result, indent=2))
    print(f"ours {result['ours']['tokens_per_sec']:.0f} tok/s, transformers+PEFT "
          f"{result['transformers+peft']['tokens_per_sec']:.0f} tok/s: {format_ratio(result['ratio'])}")
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
