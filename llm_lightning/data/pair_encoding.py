"""Turning a preference pair into two training sequences that share their prompt tokens.

Each answer is rendered after the prompt by the chat template, and its supervised span (the answer
through the end-of-turn token) is found as for supervised data (``encoding.assistant_spans``). The
prompt tokens are those both renderings share, so the chosen and rejected sequences differ only
after them. Only the answer is supervised: DPO and the reward model compare the two answers' log-
probabilities (or scores) given the same prompt.

Truncation keeps the ends that matter: the prompt loses its oldest tokens first (a BOS stays), down
to half of ``max_seq_length`` when the answers need it; an answer still too long is cut and ends
in EOS, as supervised data does, so both sequences still end the way a finished answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_lightning.data.batching import collate
from llm_lightning.data.encoding import IGNORE_INDEX, Example, token_bound, assistant_spans
from llm_lightning.data.preferences import PreferencePair
from llm_lightning.prompts import ChatTemplate
from llm_lightning.tokenizer import Tokenizer


@dataclass(frozen=True)
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer's tokens, through its end-of-turn token
    rejected_ids: list[int]
    prompt_truncated: bool = False
    answers_truncated: bool = False
    # The reference model's summed log-probabilities of (chosen, rejected), once computed (dpo.py).
    reference: tuple[float, float] | None = None
    margin: float = 0.0  # the record's margin (reward model only)

    def sequence(self, answer: list[int]) -> Example:
        ids = self.prompt_ids + answer
        return Example(ids, [IGNORE_INDEX] * len(self.prompt_ids) + answer, len(self.prompt_ids),
                       self.prompt_truncated or self.answers_truncated)

    @property
    def chosen(self) -> Example:
        return self.sequence(self.chosen_ids)

    @property
    def rejected(self) -> Example:
        return self.sequence(self.rejected_ids)

    def __len__(self) -> int:
        """The longer sequence's length: what a batch pads to."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _rendered(pair: PreferencePair, answer: str, tokenizer: Tokenizer, template: ChatTemplate):
    """(token ids of prompt + answer, where the answer starts, where its end-of-turn ends)."""
    messages, tools = template.prepare(pair.with_answer(answer).messages, pair.prompt.tools)
    text, spans = assistant_spans(messages, template, tools)
    start, end = spans[-1]
    ids = tokenizer.encode(text, bos=True)
    return ids, token_bound(tokenizer, text, start, ids), token_bound(tokenizer, text, end, ids)


def encode_pair(pair: PreferencePair, tokenizer: Tokenizer, template: ChatTemplate, *,
                max_seq_length: int) -> PairExample | None:
    """The pair's two sequences, or None when the prompt's last half and an answer token cannot fit."""
    chosen, chosen_start, chosen_end = _rendered(pair, pair.chosen, tokenizer, template)
    rejected, rejected_start, rejected_end = _rendered(pair, pair.rejected, tokenizer, template)
    shared = 0
    for a, b in zip(chosen[:min(chosen_start, rejected_start)], rejected):
        if a != b:
            break
        shared += 1
    prompt, chosen, rejected = chosen[:shared], chosen[shared:chosen_end], rejected[shared:rejected_end]
    if not chosen or not rejected:
        return None
    longest = max(len(chosen), len(rejected))
    prompt_budget = max(max_seq_length - longest, max_seq_length // 2)
    prompt_truncated = len(prompt) > prompt_budget
    if prompt_truncated:
        # A BOS the tokenizer adds stays; a template's opening token (ChatML's <|im_start|>) is text
        keep_bos = tokenizer.add_bos and bool(prompt) and prompt[0] == tokenizer.bos_id
        prompt = prompt[:1] + prompt[len(prompt) - prompt_budget + 1:] if keep_bos else prompt[-prompt_budget:]
    answer_budget = max_seq_length - len(prompt)
    if answer_budget < 2:
        return None
    answers_truncated = longest > answer_budget
    if answers_truncated:
        chosen, rejected = ([*answer[:answer_budget - 1], tokenizer.eos_id] if len(answer) > answer_budget else answer
                            for answer in (chosen, rejected))
    return PairExample(prompt, chosen, rejected, prompt_truncated, answers_truncated, margin=pair.margin or 0.0)


def collate_pairs(pairs: list[PairExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """The chosen sequences then the rejected ones, as one batch (one forward for both), and the
    reference log-probabilities when the pairs carry them, and each pair's margin."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=pad_id,
                    pad_to_multiple_of=pad_to_multiple_of)
    batch["margins"] = torch.tensor([p.margin for p in pairs])
    if all(p.reference is not None for p in pairs):
        batch["reference_log_probs"] = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs],
                                                    dtype=torch.float64)
    return batch
