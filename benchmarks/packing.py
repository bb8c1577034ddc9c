"""Sample packing vs length-grouped batches: padding and training speed on real data.

    python benchmarks/packing.py --data ../shared/data/glaive_toolcall_en_demo.json --seq-len 1024
    python benchmarks/packing.py --data ../shared/data/alpaca_en_demo.json --seq-len 512

Both modes batch the same training examples as ``AlpacaDataModule`` does (the model's own chat
template for conversations, the Alpaca template for Alpaca records): length-grouped batches of
``--batch`` examples, and packed rows of ``--seq-len`` tokens, as many rows per batch as hold
about the same number of tokens. The padding fraction is over the whole epoch. Speed is real
(non-padding) tokens per second of LoRA training steps on the embedded SmolLM2-135M (forward,
loss, backward, AdamW; r16 on wq/wv), the two modes alternating batch by batch (``ab_rounds``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ab_rounds import alternate, format_ratio, machine, speed_ratio
from llm_lightning import load_pretrained
from llm_lightning.data import AlpacaDataModule
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.loss import model_nll


def epoch_batches(args, tokenizer, packing: bool, batch_size: int) -> list[dict[str, torch.Tensor]]:
    module = AlpacaDataModule(args.data, tokenizer=tokenizer, max_seq_length=args.seq_len, val_size=0,
                              batch_size=batch_size, packing=packing, limit=args.limit)
    module.setup()
    return list(module.train_dataloader())


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Non-padding positions: packed padding is document -1; examples end in EOS, never in pad."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return int(sum((row != pad_id).nonzero().max() + 1 for row in batch["input_ids"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="examples per length-grouped batch")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--output", default="packing.json")
    args = parser.parse_args()

    model, tokenizer = load_pretrained(None)
    apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, targets=("wq", "wv")), lora_dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    grouped = epoch_batches(args, tokenizer, packing=False, batch_size=args.batch)
    mean_length = sum(real_tokens(b, tokenizer.pad_id) for b in grouped) / sum(len(b["input_ids"]) for b in grouped)
    rows = max(1, round(args.batch * mean_length / args.seq_len))
    modes = {"length-grouped": grouped, "packed": epoch_batches(args, tokenizer, packing=True, batch_size=rows)}
    report = {"data": args.data, "seq_len": args.seq_len, "grouped_batch": args.batch, "packed_rows_per_batch": rows,
              "machine": machine("cpu")}
    for name, batches in modes.items():
        positions = sum(b["input_ids"].numel() for b in batches)
        real = sum(real_tokens(b, tokenizer.pad_id) for b in batches)
        report[name] = {"batches": len(batches), "positions": positions, "real_tokens": real,
                        "padding_fraction": 1 - real / positions}

    def step(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        loss, tokens = model_nll(model, batch["input_ids"], batch["labels"], positions=batch.get("positions"),
                                 document_ids=batch.get("document_ids"))
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for batches in modes.values():
        step(batches[0])  # warm-up
    tokens = {name: [] for name in modes}  # real tokens of each timed batch

    def side(name: str):
        def run(index: int) -> float:
            batch = modes[name][(index + 1) % len(modes[name])]
            tokens[name].append(real_tokens(batch, tokenizer.pad_id))
            return step(batch)
        return run

    times = alternate({name: side(name) for name in modes}, args.rounds)
    for name in modes:
        report[name]["real_tokens_per_sec"] = sum(tokens[name]) / sum(times[name])
        report[name]["epoch_seconds_estimate"] = report[name]["real_tokens"] / report[name]["real_tokens_per_sec"]
    per_token = {name: [t / n for t, n in zip(times[name], tokens[name])] for name in modes}
    report["speed_ratio_packed"] = speed_ratio(per_token["packed"], per_token["length-grouped"])
    print(json.dumps(report, indent=2))
    for name in modes:
        r = report[name]
        print(f"{name}: {r['batches']} batches, padding {r['padding_fraction']:.1%}, "
              f"{r['real_tokens_per_sec']:.0f} real tok/s, epoch ~{r['epoch_seconds_estimate']:.0f} s")
    print(f"packed vs length-grouped, time per real token: {format_ratio(report['speed_ratio_packed'])}")
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
