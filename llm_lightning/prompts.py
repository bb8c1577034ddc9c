"""Prompt templates, shared by training, generation and evaluation so they never drift apart.

The Alpaca templates are the Stanford Alpaca ones, word for word; ``chat`` is the ChatML format
SmolLM2-Instruct was tuned on; ``none`` passes text through for zero- and few-shot prompting.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class PromptTemplate:
    name: str

    def format(self, instruction: str, input: str = "") -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Alpaca(PromptTemplate):
    name: str = "alpaca"

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class ChatML(PromptTemplate):
    """``<|im_start|>role ... <|im_end|>`` with the system message SmolLM2's GGUF template inserts."""

    system: str = SMOLLM2_SYSTEM
    name: str = "chat"

    def format(self, instruction: str, input: str = "") -> str:
        user = f"{instruction}\n\n{input}" if input else instruction
        return (
            f"<|im_start|>system\n{self.system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


@dataclass(frozen=True)
class Raw(PromptTemplate):
    name: str = "none"

    def format(self, instruction: str, input: str = "") -> str:
        return f"{instruction}\n{input}" if input else instruction


TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (Alpaca(), ChatML(), Raw())}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
