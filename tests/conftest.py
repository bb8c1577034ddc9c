"""Shared fixtures: tiny random models saved by transformers, a tokenizer trained here, real data paths."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (the README runs ``-n 2``) each worker gets its share of the cores as torch
# threads, set before torch is imported here or in any ``train.py`` the tests spawn: two workers
# with all cores each oversubscribe a 2-core CI machine and spin in OpenMP barriers.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import torch  # noqa: E402

from llm_lightning.cpu_kernels import cpu_flags  # noqa: E402

# CI runs the kernel tests again with ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA lowered to AVX2.
# Inductor's cache key leaves those out, and a decode graph compiled under AVX-512 and replayed
# from the cache under the AVX2 limits crashed (segfault) here: each ISA setting gets its own cache.
_isa = "-".join(os.environ.get(k, "native") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"llm_lightning_inductor_{_isa}"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_VOCAB = 384

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?",
    "Give three tips for staying healthy: eat well, sleep enough, and move every day.",
    "Héllo wörld, naïve café — emoji 🚀 and tabs\tand newlines\n",
]


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained here on a few sentences (fits TINY_VOCAB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}
    ))
    return directory


def make_hf_llama(*, n_kv_heads: int = 4, tied: bool = False, seed: int = 0, rope_scaling: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    if rope_scaling:
        rope = {"rope_theta": 500000.0, **rope_scaling}
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, tie_word_embeddings=tied,
        rms_norm_eps=1e-5, max_position_embeddings=256, rope_parameters=rope,
    )
    model = LlamaForCausalLM(config).eval()
    # Random norms too, so a wrong norm mapping cannot hide behind all-ones weights.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_hf_dir(model, directory: Path, tokenizer_dir: Path, *, bin_format: bool = False) -> Path:
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    if bin_format:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def tiny_lora_model(vocab_size: int):
    """The tiny LLaMA, seeded, with LoRA r4 on every linear layer and a nonzero B (so the adapters
    have gradients of their own from the first step)."""
    from llm_lightning import LLaMA, LLaMAConfig
    from llm_lightning.lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=vocab_size))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("all",)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.normal_(0, 0.02)
    return model


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session."""
    from llm_lightning import load_pretrained

    return load_pretrained()


@pytest.fixture(scope="session")
def default_gguf_path():
    from llm_lightning.loading import default_model_path

    return default_model_path()


def write_preference_pairs(path: Path, count: int = 24) -> Path:
    """Pairs made from the bundled Alpaca sample (data this project wrote): each record's answer is
    chosen over the next record's answer, as a ``{instruction, input, chosen, rejected}`` file."""
    from llm_lightning.data.records import BUNDLED_SAMPLE

    records = json.loads(BUNDLED_SAMPLE.read_text())[:count + 1]
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
              "rejected": records[i + 1]["output"]} for i, r in enumerate(records[:count])]
    path.write_text(json.dumps(pairs))
    return path


def pytest_collection_modifyitems(config, items):
    """The README's last test stage emulates an AVX2-only CPU (``ATEN_CPU_CAPABILITY=avx2`` and
    friends). On a CPU whose AVX family ends at AVX2 (no AVX-512, AVX-VNNI, AVX-NE-CONVERT or AMX)
    that is the native setting, so the stage would repeat the main run test for test: it skips,
    saying so, rather than spend CI's time on a copy. Where the flags cannot be read, it runs."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "avx2":
        return
    flags = cpu_flags()  # the flags cpu_kernels reads, not a reading of our own
    if flags is None or "avx2" not in flags:
        return
    if {flag for flag in flags if flag.startswith(("avx", "amx"))} - {"avx", "avx2"}:  # more than AVX2
        return
    skip = pytest.mark.skip(reason="AVX2 emulation on a CPU whose AVX family ends at AVX2 is the native run, already tested")
    for item in items:
        item.add_marker(skip)
