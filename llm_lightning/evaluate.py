"""What fine-tuning changed: response perplexity and ROUGE-L, base model vs fine-tuned.

    python -m llm_lightning.evaluate ckpt_path=<train .ckpt | last> [data.path=FILE] [split=val|all]
                                     [max_examples=N] [max_new_tokens=128] [output=eval.json]

By default the data settings saved in the checkpoint reproduce the run's validation split.
Perplexity is exp(total NLL / total supervised tokens) over the responses, masked exactly as in
training; ROUGE-L (torchmetrics) compares greedy answers with the reference outputs. The base
numbers come from the same model with its adapter switched off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from pathlib import Path

import torch
from torchmetrics.text.rouge import ROUGEScore

from llm_lightning.adapter import find_last_checkpoint, load_adapter
from llm_lightning.cli import exit_on_user_error, parse_settings
from llm_lightning.data import AlpacaDataModule, encode_record, read_records
from llm_lightning.data.batching import collate
from llm_lightning.data.encoding import Example
from llm_lightning.errors import UserFacingError
from llm_lightning.generation import generate
from llm_lightning.lora import lora_disabled
from llm_lightning.model import LLaMA
from llm_lightning.loss import model_nll
from llm_lightning.pretrained import load_pretrained

DEFAULTS = {
    "ckpt_path": None, "model": None, "tokenizer": None, "force_adapter_load": False,
    "data": {"path": None, "template": None, "max_seq_length": None, "val_size": None, "limit": None, "seed": None},
    "split": "val", "max_examples": None, "max_new_tokens": 128, "batch_size": 8, "output": "eval.json",
}


@torch.no_grad()
def perplexity(model: LLaMA, examples: list[Example], *, pad_id: int, batch_size: int = 8) -> float:
    """exp(summed response NLL / number of supervised tokens), batched with right padding."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([(e, -1) for e in examples[start:start + batch_size]], pad_id=pad_id)
        loss_sum, n_tokens = model_nll(model, batch["input_ids"], batch["labels"])
        total_nll, total_tokens = total_nll + loss_sum.item(), total_tokens + int(n_tokens)
    return math.exp(total_nll / max(total_tokens, 1))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    return float(ROUGEScore(rouge_keys=("rougeL",))(predictions, references)["rougeL_fmeasure"])


def evaluate(settings: dict) -> dict:
    if not settings["ckpt_path"]:
        raise UserFacingError("ckpt_path=... is required (a training checkpoint, or last)")
    if settings["split"] not in ("val", "all"):
        raise UserFacingError(f"split={settings['split']}: expected val or all")
    model, tokenizer = load_pretrained(settings["model"], tokenizer=settings["tokenizer"])
    path = find_last_checkpoint() if settings["ckpt_path"] == "last" else Path(settings["ckpt_path"])
    checkpoint = load_adapter(model, tokenizer, path, force=settings["force_adapter_load"])
    model.eval()
    saved = (checkpoint.get("AlpacaDataModule") or {}).get("settings", {})
    data = {**saved, **{k: v for k, v in settings["data"].items() if v is not None}}
    datamodule = AlpacaDataModule(tokenizer=tokenizer, **data)
    if settings["split"] == "val":
        datamodule.setup()
        examples, records = datamodule.val_examples, datamodule.val_records
    else:  # every record of the file, encoded as training would
        records, _ = read_records(datamodule.source, skip_invalid=datamodule.skip_invalid)
        pairs = [(encode_record(r, tokenizer, datamodule.template, max_seq_length=datamodule.max_seq_length,
                                train_on_inputs=datamodule.train_on_inputs), r)
                 for r in records[: datamodule.limit or None]]
        examples, records = [e for e, _ in pairs if e is not None], [r for e, r in pairs if e is not None]
    if settings["max_examples"]:
        examples, records = examples[: settings["max_examples"]], records[: settings["max_examples"]]
    if not examples:
        raise UserFacingError(f"{datamodule.source}: no examples to evaluate in split={settings['split']}")
    prompts = [datamodule.template.format(r.instruction, r.input) for r in records]
    references = [r.output for r in records]
    answer = functools.partial(generate, model, tokenizer, max_new_tokens=settings["max_new_tokens"])

    results: dict = {"checkpoint": str(path), "data": datamodule.source, "split": settings["split"],
                     "examples": len(examples)}
    for name, context in (("base", lora_disabled(model)), ("fine_tuned", contextlib.nullcontext())):
        with context:
            predictions = []
            for start in range(0, len(prompts), settings["batch_size"]):
                predictions += answer(prompts[start:start + settings["batch_size"]])
            results[name] = {
                "perplexity": perplexity(model, examples, pad_id=tokenizer.pad_id, batch_size=settings["batch_size"]),
                "rougeL": rouge_l(predictions, references),
                "sample": {"prompt": records[0].instruction, "answer": predictions[0], "reference": references[0]},
            }
    return results


def format_table(results: dict) -> str:
    rows = [f"{results['examples']} examples from {results['data']} ({results['split']})",
            f"{'':<12}{'perplexity':>12}{'ROUGE-L':>10}"]
    for name in ("base", "fine_tuned"):
        rows.append(f"{name:<12}{results[name]['perplexity']:>12.3f}{results[name]['rougeL']:>10.4f}")
    return "\n".join(rows)


@exit_on_user_error
def main(argv: list[str]) -> dict:
    settings = parse_settings(argv, DEFAULTS)
    results = evaluate(settings)
    print(format_table(results))
    Path(settings["output"]).write_text(json.dumps(results, indent=2))
    print(f"wrote {settings['output']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
