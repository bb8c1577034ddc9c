"""Turning a record into training tokens: prompt (masked) + response + EOS (supervised).

Prompt and response are tokenized together, as the model will see them at generation time,
and the prompt's own token count marks where supervision starts. EOS is always the last
token, also after truncation, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_lightning.data.records import Record
from llm_lightning.prompts import PromptTemplate
from llm_lightning.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool

    @property
    def supervised_tokens(self) -> int:
        """Tokens that contribute to the loss (labels are shifted by one against inputs)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def encode_record(record: Record, tokenizer: Tokenizer, template: PromptTemplate, *,
                  max_seq_length: int, train_on_inputs: bool = False) -> Example | None:
    """The example, or None when not even one response token fits after the prompt."""
    prompt = template.format(record.instruction, record.input)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    joint = tokenizer.encode(prompt + record.output, bos=True)
    if joint[: len(prompt_ids)] == prompt_ids:
        response_ids = joint[len(prompt_ids):]
    else:  # a merge across the boundary: keep the prompt's own tokens, encode the response apart
        response_ids = tokenizer.encode(record.output, bos=False)
    ids = prompt_ids + response_ids + [tokenizer.eos_id]
    if len(prompt_ids) + 1 >= max_seq_length:
        return None
    truncated = len(ids) > max_seq_length
    if truncated:
        ids = ids[: max_seq_length - 1] + [tokenizer.eos_id]
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return Example(ids, labels, len(prompt_ids), truncated)
