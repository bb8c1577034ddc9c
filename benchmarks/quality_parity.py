"""Training quality against transformers + PEFT: the same recipe on both sides, one evaluator.

    python benchmarks/quality_parity.py                        # the full recipe: 448 train / 64 val, 3 seeds a side
    python benchmarks/quality_parity.py --train 96 --val 32 --seeds 2     # a quick look

The recipe (issue 18): ``alpaca_en_demo.json`` split once (``--split-seed``) into training and
validation records, the Alpaca template with the prompt masked and EOS supervised, LoRA r16
alpha 32 dropout 0.05 on q/v, AdamW lr 1e-3 without weight decay, 10 warm-up steps then cosine
to 0, batch 8, one epoch, clipping at 1.0, fp32, at most 512 tokens, on the embedded
SmolLM2-135M-Instruct. Ours is ``train.py`` with its defaults for everything the recipe leaves
open (``--ours`` adds overrides, e.g. ``data.group_by_length=false``), exported with
``export.py format=peft``; the reference is a plain loop over random batches of the same
examples, each batch's loss the mean over its supervised tokens (transformers' own loss). Each
seed sets the LoRA initialisation and the data order. Both sides' adapters are scored by one
evaluator, transformers + ``peft.PeftModel``: the validation response NLL (summed over every
supervised token of the validation records, divided by their count). Prints mean and standard
deviation per side, their ratio, wall time and tokens processed, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def split_records(args, workdir: Path) -> tuple[Path, list[dict], list[dict]]:
    records = json.loads(Path(args.data).read_text())
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.split_seed)).tolist()
    train = [records[i] for i in order[:args.train]]
    val = [records[i] for i in order[args.train:args.train + args.val]]
    path = workdir / "train.json"
    path.write_text(json.dumps(train))
    return path, train, val


def encode(records: list[dict], tokenizer) -> list:
    from llm_lightning.data.conversations import from_alpaca
    from llm_lightning.data.encoding import encode_conversation
    from llm_lightning.prompts import get_template

    template = get_template("alpaca", tokenizer)
    examples = [encode_conversation(from_alpaca(r), tokenizer, template, max_seq_length=512) for r in records]
    return [e for e in examples if e is not None]


def hf_base(workdir: Path) -> Path:
    """The embedded model as a transformers checkpoint (what PEFT loads adapters onto)."""
    from llm_lightning import load_pretrained
    from llm_lightning.checkpoints.hf_format import save_hf_checkpoint

    directory = workdir / "hf_base"
    model, tokenizer = load_pretrained(None)
    save_hf_checkpoint(model, directory, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    tokenizer.save_hf(directory)
    return directory


def run_ours(seed: int, train_path: Path, workdir: Path, extra: list[str]) -> tuple[Path, float, int]:
    run_dir, adapter = workdir / f"ours_{seed}", workdir / f"ours_{seed}_peft"
    overrides = [f"data.path={train_path}", "data.val_size=0", "data.template=alpaca", "data.max_seq_length=512",
                 "data.batch_size=8", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05", "lora.targets=[wq,wv]",
                 "optimizer.lr=1e-3", "optimizer.weight_decay=0", "scheduler.warmup_steps=10", "scheduler.min_lr=0",
                 "trainer.max_epochs=1", "trainer.gradient_clip_val=1.0", "trainer.precision=32-true",
                 "trainer.limit_val_batches=0", "~callbacks.best_checkpoint", "~callbacks.samples", "logger=none",
                 f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    subprocess.run([sys.executable, "export.py", f"ckpt_path={run_dir}", "format=peft", f"output_dir={adapter}"],
                   cwd=REPO, check=True, capture_output=True)
    tokens = json.loads((run_dir / "summary.json").read_text())["train_tokens"]
    return adapter, seconds, tokens


def run_reference(seed: int, examples: list, base: Path, workdir: Path, pad_id: int) -> tuple[Path, float, int]:
    """A plain transformers + PEFT loop: random batches, each one's mean token loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from llm_lightning.data.batching import collate

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    scheduler = get_cosine_schedule_with_warmup(optimizer, 10, len(batches))
    start, tokens = time.perf_counter(), 0
    for indices in batches:
        batch = collate([examples[i] for i in indices], pad_id=pad_id)
        mask = torch.zeros_like(batch["input_ids"])
        for row, i in enumerate(indices):
            mask[row, :len(examples[i].input_ids)] = 1
        loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    adapter = workdir / f"reference_{seed}_peft"
    model.save_pretrained(adapter)
    return adapter, seconds, tokens


@torch.no_grad()
def validation_nll(adapter: Path | None, base: Path, examples: list) -> float:
    """The one evaluator: transformers + PeftModel, NLL per supervised validation token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
    total, count = 0.0, 0
    for example in examples:
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        targets = torch.tensor(example.labels[1:])
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--train", type=int, default=448)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (to split a long run)")
    parser.add_argument("--sides", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--ours", nargs="*", default=[], help="extra train.py overrides for our side")
    parser.add_argument("--output", default="quality_parity.json")
    args = parser.parse_args()

    from llm_lightning.loading import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        train_path, train_records, val_records = split_records(args, workdir)
        train_examples, val_examples = encode(train_records, tokenizer), encode(val_records, tokenizer)
        base = hf_base(workdir)
        result = {"recipe": vars(args), "base_nll": validation_nll(None, base, val_examples),
                  **{name: {} for name in args.sides}}
        print(f"base model: validation NLL {result['base_nll']:.4f}", flush=True)
        sides = {"ours": lambda seed: run_ours(seed, train_path, workdir, args.ours),
                 "reference": lambda seed: run_reference(seed, train_examples, base, workdir, tokenizer.pad_id)}
        sides = {name: run for name, run in sides.items() if name in args.sides}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name, run in sides.items():
                adapter, seconds, tokens = run(seed)
                nll = validation_nll(adapter, base, val_examples)
                result[name][seed] = {"nll": nll, "seconds": seconds, "tokens": tokens}
                print(f"seed {seed} {name}: validation NLL {nll:.4f}, {seconds:.0f} s, {tokens} tokens", flush=True)
    for name in sides:
        result[name] = {"runs": result[name], "nll": summary([r["nll"] for r in result[name].values()]),
                        "seconds": summary([r["seconds"] for r in result[name].values()])}
    if len(sides) == 2:
        result["ratio"] = result["ours"]["nll"]["mean"] / result["reference"]["nll"]["mean"]
    print(json.dumps(result, indent=2, default=str))
    for name in sides:
        nll = result[name]["nll"]
        print(f"{name}: validation NLL {nll['mean']:.4f} +- {nll['sd']:.4f} over {args.seeds} seeds, "
              f"{result[name]['seconds']['mean']:.0f} s per run")
    if "ratio" in result:
        print(f"ours / reference: {result['ratio']:.4f}")
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
