"""Exports leave the framework intact: transformers and PEFT give our logits (fp32, <= 1e-4), for
a LoRA adapter and for a DoRA adapter trained on an NF4 base (QLoRA), which exports for the
full-precision base."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning import load_pretrained
from llm_lightning.adapter import load_adapter, trained_template
from tests.conftest import TINY_VOCAB, make_hf_llama, save_hf_dir
from tests.train_runner import run_tool, run_train


VARIANTS = {"lora": (), "qlora-dora": ("lora.dora=true", "lora.base_quant=nf4")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory, tiny_tokenizer_dir):
    """A tiny HF base saved by transformers, and an adapter trained on it with train.py."""
    root = tmp_path_factory.mktemp("export")
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), root / "base", tiny_tokenizer_dir)
    run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", "trainer.limit_val_batches=0", "data.max_seq_length=128",
              "lora.targets=[wq,wk,wv,w2]", "lora.r=4", "optimizer.lr=3e-2", "scheduler.warmup_steps=0",
              *VARIANTS[request.param], run_dir=root / "run")
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    model, tokenizer = load_pretrained(base)
    load_adapter(model, tokenizer, checkpoint, quantize_base=False)  # a QLoRA adapter on the full-precision base
    input_ids = torch.randint(0, TINY_VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids)
        base_logits = load_pretrained(base)[0](input_ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    return base, checkpoint, input_ids, expected


def test_hf_export_loads_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, checkpoint, input_ids, expected = trained
    run_tool("export", f"ckpt_path={checkpoint}", f"model.source={base}", "format=hf", f"output_dir={tmp_path}")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids).logits - expected).abs().max().item() <= 1e-4
    ours = load_pretrained(tmp_path)[1]
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox jumps over the lazy dog."
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text, bos=False)
    # the adapter's template (alpaca, with the BOS this tokenizer wants) travels with the export
    template = trained_template(torch.load(checkpoint, weights_only=True), ours)
    assert template.name == "alpaca" and template.source.startswith("{{ bos_token }}")
    for messages in ([{"role": "user", "content": "Name a color."}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Bye"}]):
        expected = ours.encode(template.prompt(messages), bos=True)
        assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False) == expected
        assert expected.count(ours.bos_id) == 1


def test_peft_export_loads_in_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, checkpoint, input_ids, expected = trained
    run_tool("export", f"ckpt_path={checkpoint}", f"model.source={base}", "format=peft", f"output_dir={tmp_path}")
    dora = torch.load(checkpoint, weights_only=True)["lora_config"]["dora"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is dora
    hf_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(hf_base, tmp_path).eval()
    with torch.no_grad():
        assert (adapted(input_ids=input_ids).logits - expected).abs().max().item() <= 1e-4
    ours, tokenizer = load_pretrained(base)  # and back: generate.py ckpt_path=<adapter dir>
    load_adapter(ours, tokenizer, tmp_path)
    with torch.no_grad():
        assert (ours(input_ids) - expected).abs().max().item() <= 1e-5


def test_meta_export_round_trips(trained, tmp_path):
    base, checkpoint, input_ids, expected = trained
    run_tool("export", f"ckpt_path={checkpoint}", f"model.source={base}", "format=meta", f"output_dir={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["consolidated.00.pth", "params.json"]
    merged, _ = load_pretrained(tmp_path)
    with torch.no_grad():
        assert (merged(input_ids) - expected).abs().max().item() <= 1e-4
