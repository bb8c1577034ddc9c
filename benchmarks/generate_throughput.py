"""Batch-1 greedy decode: our ``generate`` vs transformers' ``generate``, same weights, same prompt.

    python benchmarks/generate_throughput.py                       # the embedded SmolLM2-135M, CPU
    python benchmarks/generate_throughput.py --preset llama2-7b --device cuda --dtype bfloat16
    python benchmarks/generate_throughput.py --quantize auto --pack                  # as generate.py by default on CPU
    python benchmarks/generate_throughput.py --dtype bfloat16 --quantize int8 --their-dtype float32
    python benchmarks/generate_throughput.py --preset llama2-7b --device cuda --dtype bfloat16 --compile
    python benchmarks/generate_throughput.py --lora 16   # with an adapter: generate.py ckpt_path=... quantize=null

Both sides produce exactly ``--new-tokens`` tokens (EOS is suppressed), alternating A/B after a
warm-up (``ab_rounds``); the median of ``--repeats`` runs is reported per side, and the median
per-round ratio with its min-max. With ``--lora R`` both sides carry the same random rank-R
adapter on wq/wv: ours merged into the base as ``generate.py`` samples with an adapter (kept
apart with ``--unmerged``), theirs as ``PeftModel.from_pretrained`` loads it. On CUDA the
fraction of the memory-bandwidth bound (weight bytes per token / HBM bandwidth) is printed too.
Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ab_rounds import alternate, format_ratio, machine, shapes_decided, speed_ratio
from llm_lightning import LLaMA, LLaMAConfig, cpu_kernels, generate, load_pretrained
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.checkpoints.hf_format import transformers_twin
from llm_lightning.checkpoints.peft_format import save_peft_adapter
from llm_lightning.lora import LoRAConfig, apply_lora, merge_lora
from llm_lightning.prompts import get_template
from llm_lightning.quantize import can_pack_weights, holds_int4_codes, pack_weights, quantize_int4, quantize_int8

HBM_BYTES_PER_SECOND = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def build(args) -> tuple[LLaMA, object]:
    dtype = getattr(torch, args.dtype)
    if args.preset is None:
        model, tokenizer = load_pretrained(None, dtype=dtype, device=args.device)
        return model, tokenizer
    torch.manual_seed(0)
    tokenizer = embedded_tokenizer()
    config = LLaMAConfig.from_name(args.preset, vocab_size=max(LLaMAConfig.from_name(args.preset).vocab_size,
                                                                  tokenizer.vocab_size))
    with torch.device(args.device):
        model = LLaMA(config).to(dtype).eval()
    return model, tokenizer


def add_adapter(model: LLaMA, twin, rank: int):
    """The same adapter on both sides, B drawn at random (a trained one is not zero); returns
    theirs, loaded from PEFT's own files as a PEFT user would. The twin shares some weights with
    ours (``transformers_twin`` copies only what it permutes), and merging or quantizing ours
    changes its weights in place, so the adapted layers get their own storage first."""
    from peft import PeftModel

    for block in model.layers:
        for layer in (block.attention.wq, block.attention.wv):
            layer.weight.data = layer.weight.data.clone()
    apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank, targets=("wq", "wv")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    with tempfile.TemporaryDirectory() as directory:
        save_peft_adapter(model, Path(directory), base=None)
        return PeftModel.from_pretrained(twin, directory).eval()


def check_same_model(model: LLaMA, twin, prompt_ids: torch.Tensor) -> None:
    """Both sides' next-token logits agree (before ours is quantized): the race is a fair one."""
    with torch.no_grad():
        ours, theirs = model.eval()(prompt_ids)[0, -1].float(), twin(prompt_ids).logits[0, -1].float()
    gap = float((ours - theirs).abs().max())
    if gap > 0.01 * float(ours.abs().max()):
        raise SystemExit(f"error: our model and transformers' differ, next-token logits up to {gap:.3g} apart")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ours(model, tokenizer, prompt: str, new_tokens: int, device: str, compile: bool) -> float:
    synchronize(device)
    start = time.perf_counter()
    generate(model, tokenizer, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, compile=compile)
    synchronize(device)
    return time.perf_counter() - start


def time_theirs(twin, prompt_ids: torch.Tensor, new_tokens: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = twin.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)
    synchronize(device)
    assert out.shape[1] - prompt_ids.shape[1] == new_tokens
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="random weights of a preset shape (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--their-dtype", default=None,
                        help="run transformers in another dtype (default: --dtype), e.g. ours bf16 vs its fp32")
    parser.add_argument("--quantize", choices=["auto", "int8", "int4"], default=None,
                        help="our side only: weight-only int8 or int4 (quantize.py), as generate.py quantize=...; "
                             "auto: int4 where the weights are 4-bit codes, as generate.py does by default")
    parser.add_argument("--pack", action="store_true",
                        help="our side only: as generate.py on CPU, oneDNN-packed weights where cpu_kernels "
                             "measured them faster here")
    parser.add_argument("--compile", action="store_true",
                        help="our side only: compiled static-shape decoding, as generate.py compile=true")
    parser.add_argument("--lora", type=int, default=None, metavar="R",
                        help="both sides with the same rank-R adapter on wq/wv (ours merged, as generate.py)")
    parser.add_argument("--unmerged", action="store_true", help="with --lora: ours keeps the adapter apart")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each side once per round (at least 5)")
    parser.add_argument("--output", default="generate_throughput.json")
    args = parser.parse_args()

    if args.lora is not None and args.lora < 1:
        parser.error(f"--lora {args.lora}: expected a rank of 1 or more")
    if args.unmerged and args.lora is None:
        parser.error("--unmerged keeps an adapter apart: it needs --lora R")

    model, tokenizer = build(args)
    report = machine(args.device)
    prompt = get_template("auto", tokenizer).format("Write a short story about a lighthouse keeper.")
    prompt_ids = torch.tensor([tokenizer.encode(prompt)], device=args.device)
    twin = transformers_twin(model)  # before quantizing: transformers runs the unquantized weights
    if args.lora:
        twin = add_adapter(model, twin, args.lora)
        if not args.unmerged:
            merge_lora(model)  # as generate.py does when it only samples (tools/generate.py: merges_adapter)
        check_same_model(model, twin, prompt_ids)
    if args.quantize == "auto":  # generate.py's default rule on CPU (tools/generate.py: stored_in_int4)
        stored = args.device == "cpu" and cpu_kernels.decision("int4_matmul") and holds_int4_codes(model)
        args.quantize = "int4" if stored else None
    packed = args.pack and args.quantize is None and can_pack_weights(model)
    if args.quantize is not None:
        {"int8": quantize_int8, "int4": quantize_int4}[args.quantize](model)
    elif packed:
        pack_weights(model)
    if args.their_dtype:
        twin = twin.to(getattr(torch, args.their_dtype))
    time_ours(model, tokenizer, prompt, 16, args.device, args.compile)  # warm-up both sides (and compile)
    time_theirs(twin, prompt_ids, 16, args.device)
    times = alternate({
        "ours": lambda _: time_ours(model, tokenizer, prompt, args.new_tokens, args.device, args.compile),
        "transformers": lambda _: time_theirs(twin, prompt_ids, args.new_tokens, args.device),
    }, args.repeats)
    result = {
        "model": args.preset or "smollm2-135m (embedded)", "device": args.device, "dtype": args.dtype,
        "their_dtype": args.their_dtype or args.dtype, "our_quantization": args.quantize,
        "our_compile": args.compile, "our_packed_weights": packed,
        "machine": {**report, **shapes_decided()},
        "adapter": args.lora and f"r{args.lora} on wq/wv, ours {'apart' if args.unmerged else 'merged'}",
        "new_tokens": args.new_tokens, "prompt_tokens": prompt_ids.shape[1],
        "ours_tokens_per_sec": args.new_tokens / statistics.median(times["ours"]),
        "transformers_tokens_per_sec": args.new_tokens / statistics.median(times["transformers"]),
        "ratio": speed_ratio(times["ours"], times["transformers"]),
    }
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        bandwidth = next((b for key, b in HBM_BYTES_PER_SECOND.items() if key in name), None)
        weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        if bandwidth:
            bound = bandwidth / weight_bytes
            result.update(gpu=name, bandwidth_bound_tokens_per_sec=bound,
                          fraction_of_bound=result["ours_tokens_per_sec"] / bound)
    print(json.dumps(result, indent=2))
    print(f"ours {result['ours_tokens_per_sec']:.1f} tok/s, transformers {result['transformers_tokens_per_sec']:.1f} "
          f"tok/s: {format_ratio(result['ratio'])}")
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
