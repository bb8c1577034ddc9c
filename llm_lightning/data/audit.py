"""A report on the data before any compute is spent: what was kept, how long, what is supervised.

The decoded example marks exactly where the masked prompt ends and the supervised tokens
begin, which is where template and masking bugs show up first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_lightning.data.encoding import Example
from llm_lightning.tokenizer import Tokenizer

BOUNDARY = "▶"  # printed between the masked prompt and the supervised response


@dataclass(frozen=True)
class DataAudit:
    source: str
    records_read: int
    records_skipped: int
    too_long: int
    kept: int
    train: int
    val: int
    length_percentiles: dict[str, int]
    truncated: int
    masked_ratio: float
    example: str

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "example"}

    def format(self) -> str:
        p = self.length_percentiles
        return "\n".join([
            f"data audit: {self.source}",
            f"  records: {self.records_read} read, {self.records_skipped} skipped (invalid), "
            f"{self.too_long} dropped (prompt longer than max_seq_length), {self.kept} kept "
            f"-> {self.train} train / {self.val} val",
            f"  tokens per example: p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}; "
            f"{self.truncated} truncated (EOS kept)",
            f"  masked (prompt) tokens: {self.masked_ratio:.1%} of all tokens",
            f"  example ({BOUNDARY} marks where supervision starts):",
            *("    " + line for line in self.example.splitlines()),
        ])


def audit(examples: list[Example], tokenizer: Tokenizer, *, source: str, records_read: int,
          records_skipped: int, too_long: int, train: int, val: int) -> DataAudit:
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.float)
    quantiles = torch.quantile(lengths, torch.tensor([0.5, 0.9, 0.99])).round().int().tolist()
    total = int(lengths.sum())
    supervised = sum(e.supervised_tokens for e in examples)
    first = examples[0]
    prompt = tokenizer.decode(first.input_ids[: first.prompt_length])
    response = tokenizer.decode(first.input_ids[first.prompt_length:])
    eos = " <EOS>" if first.input_ids[-1] == tokenizer.eos_id else ""
    return DataAudit(
        source=source, records_read=records_read, records_skipped=records_skipped, too_long=too_long,
        kept=len(examples), train=train, val=val,
        length_percentiles={"p50": quantiles[0], "p90": quantiles[1], "p99": quantiles[2], "max": int(lengths.max())},
        truncated=sum(e.truncated for e in examples),
        masked_ratio=1 - supervised / max(1, total),
        example=f"{prompt}{BOUNDARY}{response}{eos}",
    )
