"""Turning a conversation into training tokens: every assistant turn, through the template's
end-of-turn token, is supervised; everything else is masked.

The supervised spans are found by rendering prefixes of the conversation (up to each assistant
turn with the generation prompt, and through it), never by searching the text for markers, so any
template that renders a conversation turn by turn works. The whole conversation is tokenized once,
as the model sees it at generation time, and each span's character bounds become token bounds by
tokenizing the text before them. When a sequence is cut at ``max_seq_length``, its last token is
EOS, so the model still learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_lightning.data.conversations import Conversation
from llm_lightning.errors import DataError
from llm_lightning.prompts import ChatTemplate
from llm_lightning.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the first supervised one
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised_tokens(self) -> int:
        """Tokens that contribute to the loss (labels are shifted by one against inputs)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def assistant_spans(messages: list[dict], template: ChatTemplate, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its text and the
    end-of-turn token; whitespace the template writes after that is left out)."""
    text = template.render(messages, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:index], add_generation_prompt=True, tools=tools)
        through = template.render(messages[: index + 1], tools=tools)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"template {template.name} does not render conversations turn by turn (the text up to "
                            f"message {index} is not a prefix of the whole), so its assistant turns cannot be found")
        spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
    return text, spans


def token_bound(tokenizer: Tokenizer, text: str, chars: int, ids: list[int]) -> int:
    """How many of ``ids`` (the whole text's) cover ``text[:chars]``; when a token straddles the
    bound, the bound moves before it."""
    prefix = tokenizer.encode(text[:chars], bos=True)
    common = 0
    for a, b in zip(prefix, ids):
        if a != b:
            break
        common += 1
    return common


def encode_conversation(conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate, *,
                        max_seq_length: int, train_on_inputs: bool = False) -> Example | None:
    """The example, or None when not even one supervised token fits in ``max_seq_length``."""
    messages, tools = template.prepare(conversation.messages, conversation.tools)
    text, spans = assistant_spans(messages, template, tools)
    ids = tokenizer.encode(text, bos=True)
    supervised = [False] * len(ids)
    for start, end in spans:
        for position in range(token_bound(tokenizer, text, start, ids), token_bound(tokenizer, text, end, ids)):
            supervised[position] = True
    if train_on_inputs:
        supervised = [True] * len(ids)
    first = supervised.index(True) if True in supervised else len(ids)
    if first + 1 >= max_seq_length:
        return None
    truncated = len(ids) > max_seq_length
    if truncated:
        ids = ids[: max_seq_length - 1] + [tokenizer.eos_id]
        supervised = supervised[: max_seq_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, supervised)]
    return Example(ids, labels, first, truncated)
