"""The model itself: preset sizes, KV-cache decoding (dynamic and static-shape), padding masks,
rotary embeddings, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.model import apply_rope, rope_rotations, rotate_pairs_real

EXPECTED_PARAMETERS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMETERS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[name]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="llama2-7b"):
        LLaMAConfig.from_name("llama9")


def tiny_model(**overrides) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", **overrides)).eval()


@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 1, 4], [1] * 12])
def test_kv_cache_matches_full_forward(chunks):
    model = tiny_model()
    input_ids = torch.randint(0, 512, (2, sum(chunks)))
    with torch.no_grad():
        full = model(input_ids)
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(input_ids[:, start:start + size], start_pos=start))
            start += size
        model.clear_kv_cache()
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


def test_static_shape_decoding_matches_dynamic_decoding():
    """Tensor start_pos: every step writes one slot of an oversized cache and attends over all of
    it; the mask must hide the left padding and the unwritten slots, giving the dynamic path's logits."""
    model = tiny_model()
    prompt = torch.randint(1, 512, (2, 9))
    real = torch.ones(2, 9 + 6, dtype=torch.bool)
    real[0, :4] = False  # row 0 is a 5-token prompt, left-padded
    positions = (real[:, :9].long().cumsum(-1) - 1).clamp(min=0)
    steps = torch.randint(1, 512, (2, 6))
    logits = {}
    with torch.no_grad():
        for static in (False, True):
            model.setup_kv_cache(batch_size=2, max_seq_len=32 if static else 15)
            model(prompt, positions=positions, key_padding_mask=real[:, :9])
            mask = torch.nn.functional.pad(real, (0, 32 - 15)) if static else real
            out = []
            for step in range(6):
                slot = 9 + step
                out.append(model(steps[:, step:step + 1], start_pos=torch.tensor(slot) if static else slot,
                                 positions=positions[:, -1:] + 1 + step,
                                 key_padding_mask=mask if static else mask[:, :slot + 1]))
            logits[static] = torch.cat(out, dim=1)
            model.clear_kv_cache()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_rope_in_real_arithmetic_equals_the_complex_multiply():
    """Under torch.compile apply_rope takes the real-arithmetic branch; it must rotate identically."""
    config = LLaMAConfig.from_name("tiny")
    x = torch.randn(2, 7, 3, config.head_dim)
    rotations = rope_rotations(config, torch.arange(7).expand(2, -1) * 97)
    real = rotate_pairs_real(x.unflatten(-1, (-1, 2)), rotations).flatten(-2)
    torch.testing.assert_close(real, apply_rope(x, rotations), rtol=1e-6, atol=1e-6)


def test_left_padding_with_positions_matches_unpadded():
    model = tiny_model()
    short = torch.randint(0, 512, (1, 7))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    real = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], dim=1)
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(short)
        actual = model(padded, positions=positions, key_padding_mask=real)
    assert torch.isfinite(actual).all()
    assert (actual[:, pad:] - expected).abs().max().item() < 1e-5


def test_activation_checkpointing_gives_identical_gradients():
    input_ids = torch.randint(0, 512, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(activation_checkpointing=checkpointing).train()
        model(input_ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_kv_cache_refuses_to_overflow():
    model = tiny_model()
    model.setup_kv_cache(batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long))
