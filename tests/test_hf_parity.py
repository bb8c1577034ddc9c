"""Our LLaMA loaded from Hugging Face checkpoints gives transformers' logits (fp32, <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from llm_lightning import load_pretrained
from llm_lightning.checkpoints.hf_format import meta_to_hf_name, hf_to_meta_name, permute_from_hf, permute_to_hf
from tests.conftest import TINY_VOCAB, make_hf_llama, save_hf_dir

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path

CASES = {
    "mha-untied": dict(n_kv_heads=4, tied=False),
    "gqa-untied": dict(n_kv_heads=2, tied=False),
    "mha-tied": dict(n_kv_heads=4, tied=True),
    "gqa-tied": dict(n_kv_heads=1, tied=True),
    "llama3.1-rope": dict(n_kv_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }),
}


@pytest.mark.parametrize("bin_format", [False, True], ids=["safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, bin_format, tmp_path, tiny_tokenizer_dir):
    reference = make_hf_llama(**CASES[case])
    directory = save_hf_dir(reference, tmp_path / case, tiny_tokenizer_dir, bin_format=bin_format)
    model, tokenizer = load_pretrained(directory)

    input_ids = torch.randint(0, TINY_VOCAB, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids)
    assert actual.shape == (2, 200, TINY_VOCAB)
    assert (actual - expected).abs().max().item() <= 1e-4
    assert model.config.tie_embeddings == CASES[case].get("tied", False)
    assert tokenizer.vocab_size <= model.config.vocab_size


def test_names_and_permutation_round_trip():
    weight = torch.randn(8 * 16, 32)
    assert torch.equal(permute_from_hf(permute_to_hf(weight, 8), 8), weight)
    assert not torch.equal(permute_to_hf(weight, 8), weight)
    for name in ["tok_embeddings.weight", "layers.3.attention.wk.weight", "layers.0.feed_forward.w2.weight",
                 "layers.1.ffn_norm.weight", "norm.weight", "output.weight"]:
        assert hf_to_meta_name(meta_to_hf_name(name)) == name
    assert meta_to_hf_name("layers.2.feed_forward.w1.weight") == "model.layers.2.mlp.gate_proj.weight"
