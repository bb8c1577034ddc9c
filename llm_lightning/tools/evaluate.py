"""``python evaluate.py ckpt_path=<.ckpt | run dir | last> [data.path=FILE] [split=val|all] [max_examples=N]``

Response perplexity, and ROUGE-L and BLEU of greedy answers (``metrics.py``), base model against
fine-tuned: the base numbers come from the same model with its adapter switched off. By default the
data settings saved in the checkpoint reproduce the run's validation split. A ``stage=dpo`` or
``stage=rm`` checkpoint is ranked on preference pairs instead (``evaluate_preferences.py``), and
``task=mmlu`` or ``tasks=[...]`` run benchmarks (``evaluate_benchmarks.py``). Every run reports
through ``eval_report.report``: JSON whose top-level numbers are the tuned model's (``base`` holds
the base's), a markdown table, the logger if set, and ``results: <output>`` as the last line.
"""

from __future__ import annotations

import contextlib
import functools

from omegaconf import DictConfig

from llm_lightning.adapter import checkpoint_stage, load_adapter
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.data import AlpacaDataModule
from llm_lightning.errors import UserFacingError
from llm_lightning.generation import generate
from llm_lightning.loading import load_base_model
from llm_lightning.lora import lora_disabled
from llm_lightning.metrics import bleu, perplexity, rouge_l
from llm_lightning.settings import EvaluateSettings, to_settings
from llm_lightning.tools.eval_report import Table, report
from llm_lightning.tools.evaluate_benchmarks import evaluate_benchmarks
from llm_lightning.tools.evaluate_preferences import evaluate_preferences


def evaluate(cfg: DictConfig) -> dict:
    settings: EvaluateSettings = to_settings(cfg)
    if settings.task is not None or settings.tasks:
        return evaluate_benchmarks(settings)
    path = resolve_checkpoint(settings.ckpt_path, name=settings.name)
    stage = checkpoint_stage(path)
    if stage != "sft":
        return evaluate_preferences(settings, path, stage)
    model, tokenizer = load_base_model(settings.model)
    checkpoint = load_adapter(model, tokenizer, path, force=settings.force_adapter_load)
    model.eval()
    saved = (checkpoint.get("AlpacaDataModule") or {}).get("settings", {})
    overrides = {k: v for k, v in vars(settings.data).items() if v is not None}
    datamodule = AlpacaDataModule(tokenizer=tokenizer, **{**saved, **overrides})
    split = settings.split.value
    if split == "val":
        datamodule.setup()
        examples, records = datamodule.val_examples, datamodule.val_records
    else:  # every record of the file, encoded as training would
        records, _ = datamodule.read()
        datamodule.choose_template(records)
        examples, records, _ = datamodule.encode(records[: datamodule.limit or None])
    if settings.max_examples:
        examples, records = examples[: settings.max_examples], records[: settings.max_examples]
    if not examples:
        raise UserFacingError(f"{datamodule.source}: no examples to evaluate in split={split}")
    template = datamodule.template
    prompts = [template.prompt(r.prompt, r.tools) for r in records]
    references = [r.reference for r in records]
    answer = functools.partial(generate, model, tokenizer, max_new_tokens=settings.max_new_tokens)

    scores = {}
    for name, context in (("base", lora_disabled(model)), ("fine_tuned", contextlib.nullcontext())):
        with context:
            predictions = []
            for start in range(0, len(prompts), settings.batch_size):
                predictions += answer(prompts[start:start + settings.batch_size])
            scores[name] = {
                "perplexity": perplexity(model, examples, pad_id=tokenizer.pad_id, batch_size=settings.batch_size),
                "rouge_l": rouge_l(predictions, references),
                "bleu": bleu(predictions, references),
                "sample": {"prompt": records[0].title, "answer": predictions[0], "reference": references[0]},
            }
    results = {"checkpoint": str(path), "data": datamodule.source, "split": split, "examples": len(examples),
               **scores["fine_tuned"], "base": scores["base"]}
    table = Table(f"{len(examples)} examples from {datamodule.source} ({split})",
                  ["model", "perplexity", "ROUGE-L", "BLEU"],
                  [[name, s["perplexity"], s["rouge_l"], s["bleu"]] for name, s in scores.items()])
    return report(results, table, settings.output, settings.logger)
