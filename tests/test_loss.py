"""The fused, chunked head + loss gives the plain path's loss and gradients, in every configuration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.data.encoding import IGNORE_INDEX
from llm_lightning.linear_cross_entropy import LogitsBuffer, linear_cross_entropy
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.loss import model_nll, token_nll

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path


def masked_batch(vocab_size: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 24 tokens with a masked prompt of varying length and right padding, as collate makes."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, 24), generator=generator)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(5, 24), (11, 20), (2, 9)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
    return ids, labels


def lora_model(tied: bool, targets: tuple[str, ...]) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", tie_embeddings=tied))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.normal_(0, 0.05)
    return model.train()


def loss_and_grads(model: LLaMA, loss_fn) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids, labels = masked_batch(model.config.vocab_size)
    loss_sum, n_tokens = loss_fn(model, ids, labels)
    loss_sum.backward()
    return loss_sum.detach(), n_tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("tied", "targets"), [
    (True, ("wq", "wv")), (False, ("wq", "wv")), (True, ("all",)),
    (False, ("all", "output")),  # an adapted head takes the full-logits path
])
def test_model_nll_matches_full_logits(tied, targets):
    model = lora_model(tied, targets)
    fused_loss, fused_count, fused_grads = loss_and_grads(model, model_nll)
    plain_loss, plain_count, plain_grads = loss_and_grads(
        model, lambda m, ids, labels: token_nll(m(ids), labels))
    assert fused_count == plain_count == 19 + 9 + 7  # every supervised label after position 0 is a target
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_linear_cross_entropy_value_and_both_gradients(chunk_rows):
    """Including a trainable head weight and an upstream gradient other than 1."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(300, 16, generator=generator, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 300, (50,), generator=generator)
    targets[::4] = IGNORE_INDEX

    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * 0.5, (hidden, weight))

    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), expected)


def test_bfloat16_head_matches_plain_bfloat16_path():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(500, 32, generator=generator).bfloat16()
    targets = torch.randint(0, 500, (40,), generator=generator)
    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, expected)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=1e-2)


def test_everything_ignored_is_a_zero_loss_with_zero_gradient():
    hidden = torch.randn(6, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(20, 8), torch.full((6,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


def test_a_kept_logits_buffer_serves_later_calls_exactly():
    """Steps of different sizes through one ``LogitsBuffer``, as a training loop makes them: each
    step's loss and gradient equal a fresh call's, and the buffer is reused rather than remade
    once it is large enough."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 16, generator=generator)
    buffer = LogitsBuffer()
    for rows in (40, 90, 25):  # the second step outgrows the first's buffer, the third reuses it
        hidden = torch.randn(rows, 16, generator=generator).requires_grad_()
        targets = torch.randint(0, 300, (rows,), generator=generator)
        targets[::3] = IGNORE_INDEX
        expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
        (expected_grad,) = torch.autograd.grad(expected, hidden)
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=32, buffer=buffer)
        (grad,) = torch.autograd.grad(loss, hidden)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    first = buffer.take(32, 300, torch.device("cpu"))
    assert buffer.take(7, 300, torch.device("cpu")).data_ptr() == first.data_ptr()
    assert buffer.take(33, 300, torch.device("cpu")).data_ptr() != first.data_ptr()
