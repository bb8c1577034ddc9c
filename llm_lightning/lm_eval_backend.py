"""The ``llm_lightning`` backend of EleutherAI's lm-evaluation-harness (``harness.py`` runs it).

``LLMLightningLM`` is an lm-eval ``TemplateLM``. lm-eval turns every task into requests. The
backend answers them with this project's loader (any checkpoint format, an adapter from
``ckpt_path``, NF4 bases included), with ``loglikelihood.continuation_logprobs`` (shared
prefixes run once) and with ``generation.generate`` (stop strings). It tokenizes as lm-eval's
``hf`` backend does: the tokenizer's own BOS rule, the context's trailing spaces moved into the
continuation, and a BOS (else EOS) token standing in for an empty context. So the two give the same
log-likelihoods on the same fp32 weights (in bf16, hf's log-softmax is rounded to bf16 and ours is
not, so the two differ by about 1e-2). Under ``--apply_chat_template`` the requests are rendered by
the template generate.py would use (the adapter's, else ``template=``, else the model's own), with
the same text as the ``hf`` backend renders for the same template. Importing this module registers the backend; it needs lm-eval.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own backends, registered before ours: see registry.get_model)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm_lightning.adapter import choose_template, load_adapter
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.errors import UserFacingError
from llm_lightning.fused_projections import fused_projections
from llm_lightning.generation import generate
from llm_lightning.loading import load_pretrained
from llm_lightning.loglikelihood import continuation_logprobs
from llm_lightning.model import LLaMA
from llm_lightning.prompts import ChatTemplate, ChatTemplateError
from llm_lightning.settings import DType
from llm_lightning.tokenizer import Tokenizer


def model_dtype(name: str) -> torch.dtype:
    """The dtype the weights load in: one of the tools' ``dtype`` names, or ``auto`` (what lm-eval
    users pass for ``hf``), which is float32."""
    if name == "auto":
        return torch.float32
    if name not in DType.__members__:
        raise UserFacingError(f"dtype={name}: expected auto or one of {', '.join(DType.__members__)}")
    return getattr(torch, name)


@register_model("llm_lightning")
class LLMLightningLM(TemplateLM):
    """lm-eval requests answered by one of our models (a loaded one, or one named by ``source``)."""

    def __init__(self, model: LLaMA | None = None, tokenizer: Tokenizer | None = None, *,
                 source: str | None = None, ckpt_path: str | None = None, dtype: str = "float32",
                 device: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, template: str | None = None, force_adapter_load: bool = False,
                 **_lm_eval_options: Any) -> None:
        super().__init__()
        self._checkpoint, self._template_name, self._force = None, template, bool(force_adapter_load)
        if model is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_pretrained(source, dtype=model_dtype(dtype), device=device)
            if ckpt_path:
                self._checkpoint = load_adapter(model, tokenizer, resolve_checkpoint(str(ckpt_path)),
                                                force=self._force)
        self.model, self.tokenizer = model.eval(), tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> a fixed 8
        self._max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @functools.cached_property
    def template(self) -> ChatTemplate:
        """The chat template of ``--apply_chat_template``: the adapter's, else ``template=``, else the
        model's own (chosen when first asked for, so plain evaluations never depend on it). Only a
        fallback to plain text is refused: an adapter trained with ``none`` keeps it."""
        template = choose_template(self._template_name, self._checkpoint, self.tokenizer, force=self._force)
        if template.name == "none" and self._template_name is None and self._checkpoint is None:
            raise UserFacingError(f"{self.tokenizer.source}: the tokenizer has no chat template for "
                                  "--apply_chat_template; pass template=NAME in --model_args (alpaca, chatml, ...)")
        return template

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval keys its cached chat-templated requests by: the tokenizer and the template's text."""
        digest = hashlib.sha256(self.template.source.encode()).hexdigest()[:12]
        return f"{self.tokenizer.source}|{self.template.name}-{digest}".replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template source that ``--apply_chat_template`` renders with (lm-eval records it)."""
        return self.template.source if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's turns as one prompt; without ``add_generation_prompt`` the last (prefilled
        assistant) message is left open. A template that refuses a system message gets the turns
        without it, as the ``hf`` backend retries."""
        def render(messages: list[dict[str, str]]) -> str:
            if add_generation_prompt:
                return self.template.render(messages, add_generation_prompt=True)
            return self.template.continuation(messages)

        try:
            return render(chat_history)
        except ChatTemplateError:
            without_system = [message for message in chat_history if message["role"] != "system"]
            if len(without_system) == len(chat_history):
                raise
            return render(without_system)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own BOS rule unless told otherwise, as transformers applies it."""
        return self.tokenizer.encode(string, bos=True if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = continuation_logprobs(self.model, pairs, batch_size=self._batch_size, max_length=self.max_length)
        for request, result in zip(requests, results):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood, in disjoint windows of ``max_length`` tokens, each predicting
        its own tokens from the window before it (lm-eval's definition)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        scores = continuation_logprobs(self.model, windows, batch_size=self._batch_size, max_length=self.max_length)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut at the first stop string; the
        EOS token ends them too. Requests with the same settings run as one batch; a context that
        leaves no room for ``max_gen_toks`` keeps its last tokens, as the ``hf`` backend cuts it."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, kwargs = request.args
            groups.setdefault(self._generation_settings(kwargs), []).append(index)
        with fused_projections(self.model):  # stacked once for every batch, not per call
            for (stop, max_new_tokens, temperature, top_k, top_p), indices in groups.items():
                for start in range(0, len(indices), self._batch_size):
                    chunk = indices[start:start + self._batch_size]
                    texts = generate(self.model, self.tokenizer, [requests[i].args[0] for i in chunk],
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     stop=list(stop), max_prompt_tokens=self.max_length - max_new_tokens)
                    for i, text in zip(chunk, texts):
                        answers[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return answers

    def _generation_settings(self, kwargs: dict) -> tuple[tuple[str, ...], int, float, int | None, float]:
        """(stop strings, max new tokens, temperature, top_k, top_p) of a task's ``gen_kwargs``;
        without ``do_sample`` decoding is greedy, as in the ``hf`` backend."""
        until = kwargs.get("until") or []
        stop = (until,) if isinstance(until, str) else tuple(until)
        sampled = bool(kwargs.get("do_sample"))
        temperature = float(kwargs.get("temperature", 1.0)) if sampled else 0.0
        top_k = kwargs.get("top_k") if sampled else None
        top_p = float(kwargs.get("top_p", 1.0)) if sampled else 1.0
        max_new_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        if max_new_tokens >= self.max_length:
            raise UserFacingError(f"max_gen_toks={max_new_tokens} leaves no room for a context in "
                                  f"max_length={self.max_length}")
        return stop, max_new_tokens, temperature, top_k, top_p
