"""A report on the data before any compute is spent: what was kept, how long, what is supervised.

The decoded example marks exactly where each supervised span (an assistant turn through its
end-of-turn token) starts and ends, which is where template and masking bugs show up first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_lightning.data.encoding import IGNORE_INDEX, Example
from llm_lightning.tokenizer import Tokenizer

BOUNDARY, END = "▶", "◀"  # printed around every supervised span


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
            f"  example (supervised spans marked {BOUNDARY}...{END}):",
            *("    " + line for line in self.example.splitlines()),
        ])


def audit(examples: list[Example], tokenizer: Tokenizer, *, source: str, records_read: int,
          records_skipped: int, too_long: int, train: int, val: int) -> DataAudit:
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.float)
    quantiles = torch.quantile(lengths, torch.tensor([0.5, 0.9, 0.99])).round().int().tolist()
    total = int(lengths.sum())
    supervised = sum(e.supervised_tokens for e in examples)
    example = marked_spans(examples[0], tokenizer)
    return DataAudit(
        source=source, records_read=records_read, records_skipped=records_skipped, too_long=too_long,
        kept=len(examples), train=train, val=val,
        length_percentiles={"p50": quantiles[0], "p90": quantiles[1], "p99": quantiles[2], "max": int(lengths.max())},
        truncated=sum(e.truncated for e in examples),
        masked_ratio=1 - supervised / max(1, total),
        example=example,
    )


def marked_spans(example: Example, tokenizer: Tokenizer) -> str:
    """The example's text with each supervised run of tokens between BOUNDARY and END; special
    tokens (which ``decode`` leaves out) are shown by name."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    text = []
    for supervised, tokens in runs:
        piece = _with_special_tokens(tokens, tokenizer)
        text.append(f"{BOUNDARY}{piece}{END}" if supervised else piece)
    return "".join(text)


def _with_special_tokens(tokens: list[int], tokenizer: Tokenizer) -> str:
    pieces, plain = [], []
    for token in tokens:
        if tokenizer.decode([token]) == "":  # a special token: decode leaves it out
            pieces += [tokenizer.decode(plain), tokenizer.id_to_token(token)]
            plain = []
        else:
            plain.append(token)
    return "".join(pieces) + tokenizer.decode(plain)
