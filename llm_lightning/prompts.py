"""Chat templates, shared by training, generation, evaluation and export so they never drift apart.

A conversation is a list of messages (``{"role", "content"}``, roles system/user/assistant/tool)
and a template turns it into text. ``template=auto`` is the model's own Jinja template (HF
``tokenizer_config.json`` ``chat_template`` or GGUF ``tokenizer.chat_template``), rendered the way
transformers renders it: a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, a ``tojson`` that does not escape HTML, and the variables ``messages``,
``tools``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``. So the ids of
``Tokenizer.apply_chat_template`` equal transformers' for the same template.

Built-in templates serve models without one: ``alpaca`` (the Stanford Alpaca prompt, word for
word, with ``### Input:`` when a user message carries an ``input``), ``chatml``, ``llama2``
(Meta's ``[INST]`` format), ``llama3`` (header tokens) and ``none`` (contents back to back, for
zero- and few-shot prompts). A template that does not place the BOS token itself gets
``{{ bos_token }}`` in front for tokenizers that expect one, so the rendered text, tokenized
without special tokens, is the whole prompt: that source is what adapters record and export writes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llm_lightning.errors import UserFacingError

if TYPE_CHECKING:
    from llm_lightning.tokenizer import Tokenizer

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"

BUILTIN_TEMPLATES: dict[str, str] = {
    "alpaca": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- set input = message.get('input') or '' -%}"
        "{%- if loop.first -%}{{ (" + json.dumps(ALPACA_WITH_INPUT) + ") if input else ("
        + json.dumps(ALPACA_NO_INPUT) + ") }}{%- endif -%}"
        "{{ '### Instruction:\\n' + message.get('instruction', message['content']) + '\\n\\n' }}"
        "{%- if input -%}{{ '### Input:\\n' + input + '\\n\\n' }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' + message['content'] + eos_token }}"
        "{%- else -%}{{ raise_exception('the alpaca template has no place for a ' + message['role'] + ' message') }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
    ),
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama2": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in ('user', 'tool') -%}"
        "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{%- else -%}{{ raise_exception('the llama2 template has no place for a ' + message['role'] + ' message') }}"
        "{%- endif -%}{%- endfor -%}"
    ),
    "llama3": (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "none": (
        "{%- for message in messages -%}"
        "{%- if message.get('input') -%}{{ message.get('instruction', '') + '\\n' + message['input'] }}"
        "{%- else -%}{{ message['content'] }}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}
# Special tokens a built-in needs as single tokens, or its turns cannot end on one id.
REQUIRED_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                   "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
TEMPLATE_NAMES = ("auto", *BUILTIN_TEMPLATES)
LEGACY_NAMES = {"chat": "auto"}  # before 0.2, "chat" was SmolLM2's ChatML: the embedded model's own template


class ChatTemplateError(UserFacingError):
    """A template that is missing, does not compile, or refuses a conversation."""


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}: {exc.message})") from None


def render(source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: list | None = None, **special_tokens: str) -> str:
    """``source`` rendered for ``messages`` with transformers' variables."""
    import jinja2

    try:
        return _compile(source).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       **special_tokens)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template refused the conversation: {exc}") from None


def user_message(instruction: str, input: str = "") -> dict[str, str]:
    """An Alpaca-style request as a user message: ``content`` for every template, and the parts
    kept apart for those that lay them out separately (``alpaca``, ``none``)."""
    content = f"{instruction}\n\n{input}" if input else instruction
    return {"role": "user", "content": content, "instruction": instruction, "input": input}


TOOLS_PREAMBLE = ("You can call the following functions. To call one, answer with a JSON object holding its "
                  "\"name\" and \"arguments\".\n")


#: Put after a prefilled message's content to find where it ends in the rendered text (private-use
#: characters that no text carries); its trailing space tells whether the template trimmed it.
_OPEN_END = "\ue000open-end\ue000 "


@dataclass(frozen=True)
class ChatTemplate:
    """A template bound to one tokenizer's special tokens: what the prompts and examples are made of."""

    name: str
    source: str
    bos_token: str
    eos_token: str

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
               tools: list | None = None) -> str:
        return render(self.source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                      bos_token=self.bos_token, eos_token=self.eos_token)

    def continuation(self, messages: list[dict[str, Any]]) -> str:
        """``messages`` rendered up to the end of the last message's content, left open for the model
        to go on with (a prefilled answer: transformers' ``continue_final_message``). The content is
        rendered with a marker after it, and the text is cut where the marker lands, so a template
        that trims the content is followed (the cut is trimmed too) and the content is never
        confused with the same characters elsewhere."""
        content = messages[-1].get("content")
        if not isinstance(content, str):
            raise ChatTemplateError("the last message's content must be text to be continued")
        text = self.render([*messages[:-1], {**messages[-1], "content": content + _OPEN_END}])
        at = text.rfind(_OPEN_END.rstrip())
        if at < 0:
            raise ChatTemplateError("the chat template does not render the last message's content, so the "
                                    "text cannot stop inside that message")
        return text[:at] if text.startswith(_OPEN_END, at) else text[:at].rstrip()

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt for one request, ending where the model's answer starts."""
        return self.render([user_message(instruction, input)], add_generation_prompt=True)

    def prepare(self, messages, tools) -> tuple[list[dict[str, Any]], list | None]:
        """(messages, tools) to render: a template that does not lay tool schemas out itself
        (SmolLM2's does not) gets them in the system message, or a model fine-tuned on tool calls
        would never see which tools it may call."""
        messages = list(messages)
        if not tools:
            return messages, None
        if self.reads_tools:
            return messages, list(tools)
        schemas = TOOLS_PREAMBLE + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + schemas}, *messages[1:]], None
        return [{"role": "system", "content": schemas}, *messages], None

    def prompt(self, messages, tools=None) -> str:
        """The text that asks the model for the next assistant turn of ``messages``."""
        messages, tools = self.prepare(messages, tools)
        return self.render(messages, add_generation_prompt=True, tools=tools)

    @property
    def reads_tools(self) -> bool:
        """Whether the template itself lays out tool schemas (else the caller must, in a system message)."""
        return "tools" in self.source


def bind(name: str, source: str, tokenizer: Tokenizer) -> ChatTemplate:
    """Template text ``source`` with ``tokenizer``'s BOS and EOS tokens."""
    bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    return ChatTemplate(name, source, bos, tokenizer.id_to_token(tokenizer.eos_id))


def get_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """``name`` (``auto`` or a built-in) bound to ``tokenizer``."""
    name = LEGACY_NAMES.get(name, name)
    if name not in TEMPLATE_NAMES:
        raise ChatTemplateError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    if name == "auto" and not tokenizer.chat_template:
        raise ChatTemplateError(f"{tokenizer.source}: the tokenizer has no chat template for template=auto; "
                                f"choose one of {', '.join(BUILTIN_TEMPLATES)}")
    missing = [t for t in REQUIRED_TOKENS.get(name, ()) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ChatTemplateError(
            f"template={name} needs the special tokens {', '.join(missing)}, which {tokenizer.source} lacks; "
            "choose alpaca or llama2, or a model that has them")
    source = tokenizer.chat_template if name == "auto" else BUILTIN_TEMPLATES[name]
    if tokenizer.add_bos and tokenizer.bos_id is not None and "bos_token" not in source:
        source = "{{ bos_token }}" + source
    return bind(name, source, tokenizer)
