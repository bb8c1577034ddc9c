"""Output projection and next-token cross-entropy in one pass, a chunk of positions at a time.

The plain path materialises fp32 logits [positions, vocab] (200 MB for 1,024 positions of a 49k
vocabulary, 2 GB at 4 x 1,024 positions of LLaMA-3's 128k), then a log-softmax of the same size,
then in the backward pass a zero-filled gradient of the same size and its log-softmax backward.
Here each chunk of positions is projected, reduced to its loss, and turned into its gradient with
respect to the hidden states (and the head weight, if it is trainable) before the next chunk, so
the working set is one chunk's logits. The gradients are computed in the forward pass, as the
softmax is at hand there; the backward pass only scales them by the incoming gradient.

Positions whose target is ``ignore_index`` (prompt tokens, padding) are dropped before the
projection, so they cost nothing: with Alpaca-style prompt masking that is most positions.

A chunk's logits become its log-probabilities and then its gradient in place, in one buffer. On
CPU that buffer (64 MiB) is above the size glibc ever serves from its heap, so a fresh one is
mapped anew and page-faulted in on every call: a training loop passes a ``LogitsBuffer`` that
keeps it between steps (measured on 2 cores of a Zen 5 EPYC limited to AVX2, MKL's products:
page faults per training step 22,600 -> 5,000, median step 1.03x faster over 24 pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_lightning.cpu_kernels import uses_onednn
from llm_lightning.linear import matmul_transposed

#: fp32 logits held at once, in bytes: large enough that each chunk's matrix product runs at full
#: speed (measured on CPU: 256 rows of a 49k vocabulary), small next to the full logits.
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1 * 2**30}


class LogitsBuffer:
    """One chunk's fp32 logits on CPU, kept from call to call by whoever calls
    ``linear_cross_entropy`` repeatedly (a training loop): grown when a call needs more, never
    shrunk. On a GPU the caching allocator already reuses freed memory, and a kept buffer would
    only hold its 1 GiB through the blocks' backward pass, so there each call gets a fresh one."""

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None

    def take(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """A [rows, vocab] fp32 tensor on ``device``; its contents are undefined."""
        if device.type != "cpu":
            return torch.empty((rows, vocab), dtype=torch.float32, device=device)
        kept = self._tensor
        if kept is None or kept.device != device or kept.shape[1] != vocab or kept.shape[0] < rows:
            kept = self._tensor = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        return kept[:rows]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_rows: int | None = None,
                         buffer: LogitsBuffer | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, skipping ``ignore_index``.

    ``hidden`` [N, dim], ``weight`` [vocab, dim], ``targets`` [N]. Logits are computed in the
    dtype of ``hidden`` and reduced in fp32, as ``F.cross_entropy(F.linear(hidden, weight).float(),
    targets, reduction="sum")`` does; this returns the same value and gradients in less memory.
    ``buffer`` keeps the chunk's logits between calls (see the module docstring).
    """
    keep = targets != ignore_index
    hidden, targets = hidden[keep], targets[keep]
    if hidden.dtype != weight.dtype:  # a bf16 head on fp32 activations (QLoRA under bf16-mixed): its dtype
        hidden = hidden.to(weight.dtype)
    if chunk_rows is None:
        budget = CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cpu"])
        chunk_rows = max(1, budget // (4 * weight.shape[0]))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, buffer)
    loss, _, _ = _chunked_loss_and_gradients(hidden, weight, targets, chunk_rows, buffer,
                                             want_hidden=False, want_weight=False)
    return loss


def _chunked_loss_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                chunk_rows: int, buffer: LogitsBuffer | None, *,
                                want_hidden: bool, want_weight: bool):
    """(summed loss, d loss / d hidden or None, d loss / d weight or None), a chunk at a time."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    # One buffer for every chunk. The oneDNN product (linear.py) has no out= and returns fresh
    # logits, still far faster than MKL's; the rest happens in place in them.
    rows = min(chunk_rows, hidden.shape[0])
    onednn = uses_onednn(hidden, weight)
    if not onednn:
        logits_buffer = (buffer or LogitsBuffer()).take(rows, weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        chunk, target = hidden[start:start + chunk_rows], targets[start:start + chunk_rows, None]
        if onednn:
            logits = matmul_transposed(chunk, weight)
        elif hidden.dtype == torch.float32:
            logits = torch.mm(chunk, weight.t(), out=logits_buffer[:len(chunk)])
        else:  # the product in the model's dtype, as the plain head computes it, then fp32
            logits = logits_buffer[:len(chunk)].copy_(F.linear(chunk, weight))
        log_probs = torch.log_softmax(logits, dim=-1, out=logits)
        loss -= log_probs.gather(1, target).sum()
        if not (want_hidden or want_weight):
            continue
        # d(sum CE)/d(logits) = softmax - one_hot(target), built in place of the log-probabilities
        probs = log_probs.exp_()
        probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
        grad_logits = probs if hidden.dtype == torch.float32 else probs.to(hidden.dtype)
        if want_hidden:
            grad_hidden[start:start + chunk_rows] = matmul_transposed(grad_logits, weight.t())
        if want_weight:
            grad_weight.addmm_(grad_logits.t().float(), chunk.float())
    return loss, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int, buffer: LogitsBuffer | None) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _chunked_loss_and_gradients(
            hidden, weight, targets, chunk_rows, buffer,
            want_hidden=ctx.needs_input_grad[0], want_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
