"""``python generate.py``: load a model (and an adapter, merged into it when only sampling needs
it), template the prompts, sample, print.

One prompt streams as it decodes; several (``prompts_file``) are batched, and with
``compare=true`` the base model's answers are printed next to the fine-tuned ones; ``chat=true``
holds a conversation on stdin (``tools/chat.py``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from omegaconf import DictConfig

from llm_lightning import cpu_kernels, nf4
from llm_lightning.adapter import choose_template, load_adapter
from llm_lightning.data.conversations import Conversation
from llm_lightning.fused_projections import fused_projections
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.loading import load_base_model
from llm_lightning.generation import generate as generate_batch
from llm_lightning.generation import stream
from llm_lightning.lora import LoRALinear, lora_disabled, merge_lora
from llm_lightning.prompt_files import read_prompts
from llm_lightning.prompts import user_message
from llm_lightning.quantize import can_pack_weights, holds_int4_codes, pack_weights, quantize_int4, quantize_int8
from llm_lightning.settings import GenerateSettings, to_settings
from llm_lightning.tools.chat import chat


def stored_in_int4(settings: GenerateSettings, model) -> bool:
    """``quantize=auto``: sample from int4 codes when the weights are exactly such codes (a Q4_1
    GGUF file, as the embedded model is) and the CPU's int4 kernel works: the file's own precision,
    1.7x transformers' fp32 decoding here. Not on a GPU, nor with compare=true or compile=true."""
    return (settings.torch_device.type == "cpu" and not settings.compare and not settings.compile
            and bool(cpu_kernels.decision("int4_matmul")) and holds_int4_codes(model))


def merges_adapter(model, *, compare: bool) -> bool:
    """Sampling alone folds the adapter into its base weights, as quantizing and packing always
    did (``replace_linear_layers``): with plain fp32 or bf16 products, each adapted layer is then
    one product, not three, and q/k/v stack into one again (``fused_projections``). Not with
    compare=true (the base answers need the adapter apart), nor on an NF4 base (QLoRA's), which a
    merge would make dense."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return bool(adapted) and not compare and not any(nf4.is_nf4(m.weight) for m in adapted)


def generate(cfg: DictConfig) -> list[str]:
    settings: GenerateSettings = to_settings(cfg)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    conversations = (read_prompts(settings.prompts_file) if settings.prompts_file
                     else [Conversation((*system, user_message(settings.prompt)))])
    model, tokenizer = load_base_model(settings.model, dtype=settings.torch_dtype, device=settings.torch_device)
    checkpoint = None
    if settings.ckpt_path:
        path = resolve_checkpoint(settings.ckpt_path, name=settings.name)
        checkpoint = load_adapter(model, tokenizer, path, force=settings.force_adapter_load)
    template = choose_template(settings.template.value if settings.template else None, checkpoint, tokenizer,
                               force=settings.force_adapter_load)
    merged = merges_adapter(model, compare=settings.compare)
    if merged:
        merge_lora(model)
    if checkpoint is not None:
        how = ", merged into the base for sampling" if merged else ""
        print(f"[adapter {path}, step {checkpoint.get('global_step')}, template {template.name}{how}]", file=sys.stderr)
    quantize = settings.quantize.value if settings.quantize else None
    if quantize == "auto":
        quantize = "int4" if stored_in_int4(settings, model) else None
    if quantize is not None:
        {"int8": quantize_int8, "int4": quantize_int4}[quantize](model)
    elif settings.pack_weights and not settings.compare and not settings.compile and can_pack_weights(model):
        pack_weights(model)  # exact: the same products from a oneDNN weight layout
    if settings.torch_device.type == "cpu":
        print(cpu_kernels.describe(), file=sys.stderr)
    if quantize is not None:
        auto = " (quantize=auto: the file's own 4-bit codes; quantize=null for fp32 products)" if (
            settings.quantize.value == "auto") else ""
        print(f"[weights: {quantize}{auto}]", file=sys.stderr)
    prompts = [template.prompt(c.messages, c.tools) for c in conversations]
    sampling = settings.sampling
    options = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty, stop=sampling.stop,
                   seed=sampling.seed, compile=settings.compile)

    # The whole run samples: q/k/v and w1/w3 stacked once for it, not again for every prompt or turn
    # (a 135M model's 0.4 GB moved twice per call). ``compare`` switches the adapter off and on
    # between its runs, which a stacked product must not see (``fused_projections``).
    sampling_only = contextlib.nullcontext() if settings.compare else fused_projections(model)
    if settings.chat:
        with sampling_only:
            transcript = chat(model, tokenizer, template, sys.stdin, system=settings.system, **options)
        return [turn["reply"] for turn in transcript]
    start = time.perf_counter()
    with sampling_only:
        if len(prompts) == 1 and not settings.compare and sampling.num_beams == 1:
            pieces = []
            for piece in stream(model, tokenizer, prompts[0], **options):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print()
            outputs = ["".join(pieces)]
        else:
            variants = {"fine-tuned" if settings.compare else "output": contextlib.nullcontext()}
            if settings.compare:
                variants = {"base": lora_disabled(model), **variants}
            answers: dict[str, list[str]] = {}
            for name, context in variants.items():
                with context:
                    answers[name] = []
                    for i in range(0, len(prompts), settings.batch_size):
                        answers[name] += generate_batch(model, tokenizer, prompts[i:i + settings.batch_size],
                                                        num_beams=sampling.num_beams, **options)
            for index, conversation in enumerate(conversations):
                print(f"### {index + 1}. {conversation.title}")
                for name, texts in answers.items():
                    print(f"[{name}] {texts[index]}" if len(answers) > 1 else texts[index])
                print()
            outputs = [text for texts in answers.values() for text in texts]
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(tokenizer.encode(text, bos=False)) for text in outputs)
    print(f"[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return outputs
