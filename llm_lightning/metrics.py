"""What fine-tuning changed, measured: response perplexity, ROUGE-L and BLEU.

Perplexity is exp(total NLL / total supervised tokens) over the responses, masked exactly as in
training. ROUGE-L (F-measure, 0-1) and corpus BLEU (0-100, sacreBLEU's definition and its "13a"
tokenizer, as torchmetrics implements them) compare answers with the reference outputs.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.text import SacreBLEUScore
from torchmetrics.text.rouge import ROUGEScore

from llm_lightning.data.batching import collate
from llm_lightning.data.encoding import Example
from llm_lightning.loss import model_nll
from llm_lightning.model import LLaMA


@torch.no_grad()
def perplexity(model: LLaMA, examples: list[Example], *, pad_id: int, batch_size: int = 8) -> float:
    """exp(summed response NLL / number of supervised tokens), batched with right padding."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id=pad_id)
        loss_sum, n_tokens = model_nll(model, batch["input_ids"], batch["labels"])
        total_nll, total_tokens = total_nll + loss_sum.item(), total_tokens + int(n_tokens)
    return math.exp(total_nll / max(total_tokens, 1))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    return float(ROUGEScore(rouge_keys=("rougeL",))(predictions, references)["rougeL_fmeasure"])


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU of the answers against one reference each, on sacreBLEU's 0-100 scale."""
    return 100.0 * float(SacreBLEUScore(tokenize="13a")(predictions, [[r] for r in references]))
