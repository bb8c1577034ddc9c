"""A report on the data before any compute is spent: what was kept, how long, what is supervised.

The decoded example marks exactly where each supervised span (an assistant turn through its
end-of-turn token) starts and ends, which is where template and masking bugs show up first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    packed_rows: int | None = None  # with data.packing: rows the training examples fill
    packed_fill: float | None = None  # their real tokens over the rows' capacity
    problems: tuple[str, ...] = ()  # pre-flight findings that would ruin the run (setup refuses them)
    eos: str = ""
    prompts_truncated: int | None = None  # preference pairs: prompts that lost their oldest tokens

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "example"}

    def format(self) -> str:
        p = self.length_percentiles
        return "\n".join([
            f"data audit: {self.source}",
            f"  records: {self.records_read} read, {self.records_skipped} skipped (invalid), "
            f"{self.too_long} dropped (prompt longer than max_seq_length), {self.kept} kept "
            f"-> {self.train} train / {self.val} val",
            f"  tokens per {'sequence' if self.prompts_truncated is not None else 'example'}: p50 {p['p50']}, "
            f"p90 {p['p90']}, p99 {p['p99']}, max {p['max']}; {self.truncated} truncated (EOS kept)",
            *([f"  pairs: chosen and rejected share each prompt; {self.prompts_truncated} prompts cut from the "
               "left to fit"] if self.prompts_truncated is not None else []),
            f"  masked (prompt) tokens: {self.masked_ratio:.1%} of all tokens",
            *([f"  packed: {self.train} training examples in {self.packed_rows} rows, "
               f"{self.packed_fill:.1%} of their tokens real"] if self.packed_rows else []),
            f"  pre-flight: {'; '.join(self.problems) if self.problems else f'every assistant turn ends in a supervised EOS ({self.eos}), one BOS at most, padding masked by position'}",
            f"  example (supervised spans marked {BOUNDARY}...{END}):",
            *("    " + line for line in self.example.splitlines()),
        ])


def audit(examples: list[Example], tokenizer: Tokenizer, *, source: str, records_read: int,
          records_skipped: int, too_long: int, train: int, val: int, packed_rows: int | None = None,
          row_length: int = 0) -> DataAudit:
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
        packed_rows=packed_rows,
        packed_fill=sum(len(e.input_ids) for e in examples[:train]) / (packed_rows * row_length) if packed_rows else None,
        problems=tuple(preflight(examples, tokenizer)), eos=tokenizer.id_to_token(tokenizer.eos_id),
    )


def audit_pairs(pairs: list, tokenizer: Tokenizer, *, source: str, records_read: int, records_skipped: int,
                too_long: int, train: int, val: int) -> DataAudit:
    """The audit of preference pairs (``pair_encoding.PairExample``): their chosen and rejected
    sequences as examples, how many prompts were cut, and one pair with both answers marked."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    report = audit(sequences, tokenizer, source=source, records_read=records_read, records_skipped=records_skipped,
                   too_long=too_long, train=train, val=val)
    first = pairs[0]
    rejected = "".join(f"{BOUNDARY}{_with_special_tokens(tokens, tokenizer)}{END}"
                       for tokens in supervised_runs(first.rejected))
    return replace(report, kept=len(pairs), truncated=sum(p.answers_truncated for p in pairs),
                   prompts_truncated=sum(p.prompt_truncated for p in pairs),
                   example=f"{marked_spans(first.chosen, tokenizer)}\n(rejected instead:) {rejected}")


def runs(example: Example) -> list[tuple[bool, list[int]]]:
    """The example cut into stretches of masked and of supervised tokens: (supervised, ids)."""
    stretches: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if stretches and stretches[-1][0] == supervised:
            stretches[-1][1].append(token)
        else:
            stretches.append((supervised, [token]))
    return stretches


def supervised_runs(example: Example) -> list[list[int]]:
    """The token ids of each stretch of supervised positions (an assistant turn, normally)."""
    return [tokens for supervised, tokens in runs(example) if supervised]


def preflight(examples: list[Example], tokenizer: Tokenizer) -> list[str]:
    """What would ruin training, one line each: turns that do not end in EOS (the model would
    never learn to stop, as when a template ends turns with a token that is not the tokenizer's
    EOS), and a doubled BOS. (pad = EOS cannot hide EOS here: padding is masked by position.)"""
    problems = []
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    turns = [run for example in examples for run in supervised_runs(example)]
    # train_on_inputs supervises each example whole, ending wherever the template ends: EOS must be in it
    whole = all(label != IGNORE_INDEX for example in examples for label in example.labels)
    open_turns = [run for run in turns if (eos not in run if whole else run[-1] != eos)]
    if open_turns:
        problems.append(f"{len(open_turns)} of {len(turns)} supervised turns do not end in EOS "
                        f"{tokenizer.id_to_token(eos)!r} (one ends {tokenizer.decode(open_turns[0][-3:])!r}): the "
                        "model would not learn to stop; choose a template whose turns end in this tokenizer's EOS")
    doubled = sum(1 for example in examples if bos is not None and example.input_ids[:2] == [bos, bos])
    if doubled:
        problems.append(f"{doubled} examples start with two BOS tokens: the template writes one and so does the data")
    return problems


def marked_spans(example: Example, tokenizer: Tokenizer) -> str:
    """The example's text with each supervised run of tokens between BOUNDARY and END; special
    tokens (which ``decode`` leaves out) are shown by name."""
    text = []
    for supervised, tokens in runs(example):
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
