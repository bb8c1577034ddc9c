"""Sampling-only weights: int8 computes what it should and the embedded model keeps its answers;
oneDNN-packed weights give the plain model's logits and text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning import LLaMA, LLaMAConfig, cpu_kernels, generate, load_pretrained
from llm_lightning.lora import LoRAConfig, LoRALinear, apply_lora
from llm_lightning.prompts import get_template
from llm_lightning.linear import PackedLinear
from llm_lightning.quantize import (
    Int4Linear, Int8Linear, holds_int4_codes, int4_codes, pack_weights, quantize_int4, quantize_int8,
)
from tests.test_generate_cli import run_generate

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_product_with_its_dequantized_weight(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    layer = Int8Linear(weight.to(dtype))
    # rounding to the nearest of 255 levels per row: at most half a step off (a bf16 scale adds
    # its own rounding, up to 127 * 2^-9 of a step)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    bound = step * (0.501 if dtype == torch.float32 else 0.5 + 127 * 2**-9 + 0.01)
    assert ((layer.dequantized() - weight.to(dtype).float()).abs() <= bound).all()
    x = torch.randn(2, 5, 64, generator=generator).to(dtype)
    # on CPU the product takes bf16 activations (fp32 ones are rounded) and accumulates in fp32
    expected = F.linear(x.bfloat16().float(), layer.dequantized())
    got = layer(x)
    assert got.shape == (2, 5, 96) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=1e-2 * expected.abs().max())


def adapted_tiny_model(*, tied: bool, targets: tuple[str, ...], dtype: torch.dtype = torch.float32):
    """(model with a non-zero LoRA update, ids, its logits on them, linear layers a rewrite must replace)."""
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", tie_embeddings=tied)).to(dtype).eval()
    apply_lora(model, LoRAConfig(r=4, targets=targets))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules()) + (1 if tied else 0)
    return model, ids, expected, n_linear


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_replaces_every_linear_and_merges_the_adapter(tied):
    model, ids, expected, n_linear = adapted_tiny_model(tied=tied, targets=("all",))
    quantize_int8(model)
    assert not any(isinstance(m, (nn.Linear, LoRALinear)) for m in model.modules())
    # q/k/v and w1/w3 are one layer each, in the slots the model's forward reads
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == n_linear - 3 * model.config.n_layers
    for block in model.layers:
        assert isinstance(block.attention.fused_qkv, Int8Linear) and isinstance(block.feed_forward.fused_w13, Int8Linear)
        assert block.attention.wq is block.attention.wk is block.attention.wv is block.feed_forward.w1 is None
    with torch.no_grad():
        logits = model(ids)
    relative = (logits - expected).norm() / expected.norm()
    assert relative < 0.02, relative


@pytest.fixture(scope="module")
def embedded_fp32_and_int8():
    reference, tokenizer = load_pretrained(None)
    quantized = quantize_int8(load_pretrained(None, dtype=torch.bfloat16)[0])
    return reference, quantized, tokenizer


def divergence_on_a_real_answer(reference, quantized, tokenizer) -> tuple[float, float]:
    """(mean KL(reference || quantized), top-1 agreement) over fp32's own 64-token answer to a story prompt."""
    prompt = get_template("auto", tokenizer).format("Write a short story about a lighthouse keeper.")
    answer = generate(reference, tokenizer, prompt, max_new_tokens=64)
    ids = torch.tensor([tokenizer.encode(prompt + answer)])
    with torch.no_grad():
        expected = torch.log_softmax(reference(ids).float(), -1)
        got = torch.log_softmax(quantized(ids).float(), -1)
    kl = (expected.exp() * (expected - got)).sum(-1).mean()
    return float(kl), float((got.argmax(-1) == expected.argmax(-1)).float().mean())


def test_embedded_model_in_int8_keeps_its_predictions(embedded_fp32_and_int8):
    """Against fp32 on a real answer: measured KL 0.005 and 97% top-1 agreement (bf16 alone: 96%)."""
    reference, quantized, tokenizer = embedded_fp32_and_int8
    kl, agreement = divergence_on_a_real_answer(reference, quantized, tokenizer)
    assert kl < 0.02 and agreement > 0.93, (kl, agreement)
    assert "Paris" in generate(quantized, tokenizer, get_template("auto", tokenizer).format("What is the capital of France?"),
                               max_new_tokens=16)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_cli_quantized(scheme):
    result = run_generate("prompt=What is the capital of France?", "max_new_tokens=16", f"quantize={scheme}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    wrong = run_generate("quantize=int3")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "quantize=int3: Invalid value 'int3', expected one of [auto, int8, int4]" in wrong.stderr


def q4_1_like_weight(out_features: int = 48, in_features: int = 96, seed: int = 0):
    """(weight, codes) as llama.cpp's Q4_1 stores them: per group of 32, codes 0-15 that reach both
    ends, and a scale and minimum rounded to fp16."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
    codes.view(out_features, -1, 32)[..., 3], codes.view(out_features, -1, 32)[..., 17] = 0, 15
    scale = (torch.rand(out_features, in_features // 32, generator=generator) / 50).half().float()
    low = (-torch.rand(out_features, in_features // 32, generator=generator) / 10).half().float()
    weight = codes.float().view(out_features, -1, 32) * scale[..., None] + low[..., None]
    return weight.view(out_features, in_features), codes


def test_int4_codes_of_a_q4_1_matrix_are_its_own():
    weight, codes = q4_1_like_weight()
    found, scale, low = int4_codes(weight)
    assert torch.equal(found.long(), codes)
    torch.testing.assert_close((found.view(48, -1, 32) * scale[..., None] + low[..., None]).view(48, 96), weight,
                               rtol=0, atol=1e-6)


def test_only_4_bit_codes_are_taken_for_int4_by_default():
    """generate.py's quantize=auto: the embedded model's Q4_1 matrices are codes; random or bf16-rounded weights are not."""
    model, _ = load_pretrained(None)
    assert holds_int4_codes(model)
    apply_lora(model, LoRAConfig(r=4, targets=("wq", "wv")))  # adapted layers go to int8 and are not asked
    assert holds_int4_codes(model)
    assert not holds_int4_codes(load_pretrained(None, dtype=torch.bfloat16)[0])
    assert not holds_int4_codes(LLaMA(LLaMAConfig.from_name("tiny")))


def test_int4_linear_is_the_product_with_its_dequantized_weight():
    weight, _ = q4_1_like_weight(seed=1)
    layer = Int4Linear(weight)
    # the scales and zeros are held in bf16 (the kernel's): within bf16's rounding of the weights
    assert (layer.dequantized() - weight).abs().max() <= 2**-8 * weight.abs().max()
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x.bfloat16().float(), layer.dequantized())
    got = layer(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())


def test_int4_keeps_adapted_layers_and_the_head_in_int8():
    """4-bit codes of a merged layer would round most of a LoRA update away; int8 keeps it."""
    model, _, _, n_linear = adapted_tiny_model(tied=True, targets=("wq", "wv"))
    merged = {name: m.weight + m.delta_weight() for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    quantize_int4(model)
    modules = dict(model.named_modules())
    int4 = [m for m in modules.values() if isinstance(m, Int4Linear)]
    assert all(isinstance(modules[name], Int8Linear) for name in merged) and isinstance(model.output, Int8Linear)
    # q/k/v mix int8 and int4 and stay apart; w1/w3 are one int4 layer
    assert all(isinstance(block.feed_forward.fused_w13, Int4Linear) for block in model.layers)
    assert all(block.attention.fused_qkv is None for block in model.layers)
    assert len(int4) + len(merged) + 1 == n_linear - model.config.n_layers and int4
    for name, weight in merged.items():
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        assert ((modules[name].dequantized() - weight).abs() <= 0.501 * step).all()


def test_embedded_model_in_int4_keeps_its_predictions(embedded_fp32_and_int8):
    """The embedded GGUF stores its matrices in Q4_1: int4 gets their own codes back, and differs
    from fp32 by the bf16 activations and scales and the int8 head."""
    reference, _, tokenizer = embedded_fp32_and_int8
    quantized = quantize_int4(load_pretrained(None)[0])
    kl, agreement = divergence_on_a_real_answer(reference, quantized, tokenizer)
    assert kl < 0.02 and agreement > 0.93, (kl, agreement)
    # measured: KL 0.002, 99% top-1; the same 64 greedy tokens with AVX-512 kernels, 55 with AVX2 ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_packed_weights_give_the_plain_logits(dtype, tied):
    model, ids, expected, n_linear = adapted_tiny_model(tied=tied, targets=("wq", "w2"), dtype=dtype)
    if not cpu_kernels.onednn_supported(dtype):
        pytest.skip(f"oneDNN {dtype} packing is not on this CPU or build (cpu_kernels says so)")
    expected = expected.float()
    pack_weights(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == n_linear - 3 * model.config.n_layers
    with torch.no_grad():
        logits = model(ids).float()
    # fp32: summation order only; bf16: the merged adapter is rounded into the bf16 weights
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def stacked_rows_cases():
    """(name, sampling layer factory) for every rewrite this CPU runs with its own kernel."""
    yield "int8", Int8Linear
    if cpu_kernels.decision("int4_matmul"):
        yield "int4", Int4Linear
    if cpu_kernels.onednn_supported(torch.float32):
        yield "packed fp32", PackedLinear


@pytest.mark.parametrize("name, make", list(stacked_rows_cases()))
def test_a_stacked_sampling_layer_computes_each_projection_as_it_would_alone(name, make):
    """What ``replace_linear_layers`` relies on when it makes one layer of q/k/v or w1/w3."""
    generator = torch.Generator().manual_seed(5)
    weights = [q4_1_like_weight(rows, 96, seed=rows)[0] for rows in (48, 16, 32)]
    x = torch.randn(1, 3, 96, generator=generator)
    alone = torch.cat([make(weight)(x) for weight in weights], dim=-1)
    # the same codes, scales and sums: equal on a Zen 3 (AVX2); a kernel may block rows differently elsewhere
    torch.testing.assert_close(make(torch.cat(weights))(x), alone, rtol=1e-6, atol=1e-6 * alone.abs().max().item())


def test_embedded_model_with_packed_bf16_weights_writes_the_same_text():
    if not cpu_kernels.onednn_supported(torch.bfloat16):
        pytest.skip("oneDNN bf16 packing is not on this CPU or build (cpu_kernels says so)")
    model, tokenizer = load_pretrained(None, dtype=torch.bfloat16)
    prompts = [get_template("auto", tokenizer).format(p) for p in ("Write a short story about a lighthouse keeper.",
                                                          "Name three colors.")]
    expected = generate(model, tokenizer, prompts, max_new_tokens=32)
    assert generate(pack_weights(model), tokenizer, prompts, max_new_tokens=32) == expected
