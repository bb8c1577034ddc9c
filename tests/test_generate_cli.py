"""``python generate.py``: the base model, and an adapter put back from a training checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, cpu_kernels
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.tools.generate import merges_adapter
from tests.train_runner import REPO, TINY, run_train


def run_generate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.kernels  # bf16 crashed on AVX2 CPUs when packed weights were assumed to exist there
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_model_answers(dtype):
    result = run_generate("prompt=What is the capital of France?", "max_new_tokens=16", f"dtype={dtype}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout and "tokens/s" in result.stderr
    assert result.stderr.startswith("[cpu kernels: ")  # which fast paths this machine chose, in one line
    # quantize=auto: the embedded Q4_1 matrices are sampled from their own 4-bit codes (exact in fp32 only)
    stored = dtype == "float32" and cpu_kernels.decision("int4_matmul")
    assert ("[weights: int4 (quantize=auto" in result.stderr) == bool(stored)


def test_adapter_from_training_checkpoint(tmp_path):
    run_train("logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0",
              "data.max_seq_length=128", "optimizer.lr=1e-2", run_dir=tmp_path)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    result = run_generate(f"ckpt_path={checkpoint}", "prompt=Give the plural form of the noun: mouse",
                          "max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2, template alpaca, merged into the base for sampling" in result.stderr
    other = run_generate(f"ckpt_path={checkpoint}", "template=chatml", "max_new_tokens=2")
    assert other.returncode == 2 and "template=chatml is not the template the adapter was trained with (alpaca)" in (
        other.stderr)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Give the plural form of the noun: goose\nWhat is 2 plus 2?\n")
    compared = run_generate(f"ckpt_path={checkpoint}", f"prompts_file={prompts}", "compare=true", "max_new_tokens=8")
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert compared.stdout.count("[base] ") == 2 and compared.stdout.count("[fine-tuned] ") == 2
    assert "step 2, template alpaca]" in compared.stderr  # kept apart: the base answers switch it off
    assert "### 2. What is 2 plus 2?" in compared.stdout

    alpaca = tmp_path / "prompts.json"
    alpaca.write_text('[{"instruction": "Spell the word backwards.", "input": "river", "output": ""}]')
    batch = run_generate(f"ckpt_path={checkpoint}", f"prompts_file={alpaca}", "num_beams=2", "max_new_tokens=6")
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert "### 1. Spell the word backwards.\n[input] river" in batch.stdout


def test_the_adapter_is_merged_when_only_sampling_needs_it():
    def tiny() -> LLaMA:
        torch.manual_seed(0)
        return LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64))

    model = tiny()
    assert not merges_adapter(model, compare=False)  # no adapter, nothing to merge
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv")))
    assert merges_adapter(model, compare=False)
    assert not merges_adapter(model, compare=True)  # the base answers switch the adapter off
    qlora = apply_lora(tiny(), LoRAConfig(r=2, targets=("wq", "wv"), base_quant="nf4"))
    assert not merges_adapter(qlora, compare=False)  # a merge would make the 4-bit base dense


def test_adapter_for_another_base_is_refused(tmp_path):
    run_train(*TINY, "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", run_dir=tmp_path)
    result = run_generate(f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "adapter was trained with different base model weights" in result.stderr
