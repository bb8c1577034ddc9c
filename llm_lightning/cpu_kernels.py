"""Every fast CPU path of the project, each switched on only where it works and pays.

PyTorch ships more CPU matrix-product kernels than its public ops choose between: oneDNN's fp32
product (``torch.ops.mkldnn._linear_pointwise``), oneDNN's reordered ("packed") weights, an int8
weight kernel (``torch._weight_int8pack_mm``) and a group-wise int4 one
(``aten._weight_int4pack_mm_for_cpu``). Which of them is faster than plain
``F.linear`` (MKL for fp32) depends on the CPU, not on its vendor: measured with SmolLM2's shapes,
oneDNN's fp32 product ran at 2x MKL's rate on a Zen 5 EPYC, at MKL's rate on a Sapphire Rapids
Xeon and below it for one-row products; packed bf16 weights decoded 1.5x faster on the Zen 5 and
1.6x slower on the Xeon (AMX); and packed bf16 weights do not exist at all below AVX-512 (oneDNN
refuses them: "bf16 path needs avx_ne_convert or avx512bw").

So each path here is a private op called in one place, and it is used only after
- a trial call on a tiny case succeeded and matched the portable op within a stated tolerance, and,
- where it competes with an exact portable op, a measurement on this machine found it faster by a
  stated margin, in its shape class: products of many rows (training, prompts) and of few rows
  (decoding one token per sequence) are measured apart, as they favour different kernels, and
  products of few rows per weight shape, as the one-row kernels trade places with the number of
  outputs (``vector_kernel``).

One path is made of public ops: ``split_linear`` runs a one-row product as a batched product over
row blocks of the weight, which PyTorch spreads over its threads. MKL's one-row kernel reads a
weight as fast with one thread as with two (13 GB/s for SmolLM2's 576 x 576 on a 2-core Zen 3,
where a plain sum over memory reads 20 GB/s with one thread and 32 with two), and so does
oneDNN's for the smaller weights; split, the same MKL products read 19-26 GB/s there.

Decisions are made once per process, lazily, from speeds measured once per machine
(``kernel_cache``); ``describe()`` is the one log line that says them.
``LLM_LIGHTNING_FAST_KERNELS=0`` turns every path off: the project then runs portable PyTorch ops only.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_lightning import kernel_cache
from llm_lightning.config import LLaMAConfig

SWITCH = "LLM_LIGHTNING_FAST_KERNELS"

#: Packed weights replace plain ones for sampling only when they are at least this much faster
#: on a stand-in case: a tie goes to the plain weights. Noisy timings near a line no longer flip
#: the choice between processes: see ``kernel_cache``.
MIN_SPEEDUP = 1.25

#: oneDNN takes training's products from MKL when it ran one block's products (``_matrix_case``)
#: at least this much faster. Whole training steps followed the case: on a 2-core Zen 4 the case
#: measured 1.09-1.19x and steps 1.09x (median of 24 alternating pairs, 1.12x in total time); the
#: same CPU limited to AVX2, 0.91-0.96x and 0.93x. A Zen 5 measured 2.5x.
MIN_MATRIX_SPEEDUP = 1.05

#: For one weight shape (``vector_kernel``) a kernel needs only a margin over noise: the shape itself
#: is measured, where a shape class is judged on a stand-in case.
MIN_SHAPE_SPEEDUP = 1.1

#: Products with at most this many rows are in the "vector" class (decoding), the rest in "matrix".
VECTOR_ROWS = 16

#: Bytes of weights a one-row timing goes through in turn: more than a last-level cache holds.
STREAMED_BYTES = 64 * 2**20

#: Relative error allowed in a trial, measured as ||ours - portable|| / ||portable||.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Decision:
    """Whether a path is on, and why: the trial's failure, or the measured speed against the portable op."""

    on: bool
    reason: str

    def __bool__(self) -> bool:
        return self.on


def enabled() -> bool:
    """False when ``LLM_LIGHTNING_FAST_KERNELS=0``: portable PyTorch ops only."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


# -- the private ops, each called here and nowhere else ------------------------------------------

def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN; ``weight`` may be a transposed view or a ``pack`` result."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 parts: int) -> torch.Tensor:
    """x @ weight.T (+ bias) as one batched product over ``parts`` row blocks of a contiguous
    ``weight``: each block's product is MKL's, as in ``F.linear``, and the batch goes to all threads.
    Decoding calls it for most products of a token, so it is written in as few calls as it takes."""
    out_features, in_features = weight.shape
    blocks = weight.view(parts, out_features // parts, in_features).transpose(1, 2)  # [parts, in, out / parts]
    if x.numel() == in_features:  # one row: the blocks' outputs [parts, 1, block] lie in order
        out = torch.bmm(x.reshape(1, 1, in_features).expand(parts, 1, in_features), blocks)
        out = out.view(*x.shape[:-1], out_features)
    else:
        out = torch.bmm(x.reshape(-1, in_features).expand(parts, -1, -1), blocks)
        out = out.transpose(0, 1).reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout, for ``onednn_linear`` (batch hint 1)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ (weight_int8 [out, in] * scale [out, 1]).T by PyTorch's int8 weight kernel."""
    return torch._weight_int8pack_mm(x, weight_int8, scale)


#: Rows of a column block in PyTorch's int4 CPU layout (``innerKTiles``), as its own CPU tests use.
INT4_INNER_K_TILES = 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, in] (values 0-15) in the layout of PyTorch's int4 CPU kernel."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), INT4_INNER_K_TILES)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ W.T with W[o, i] = (code - 8) * scale[g, o] + zero[g, o], g = i // group_size;
    ``scale_and_zero`` is [in / group_size, out, 2] in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(SDPA's output [B, H, L, D], each query's log-sum-exp [B, H, L]) by the CPU flash-attention
    kernel behind ``F.scaled_dot_product_attention``, which alone returns the log-sum-exp; k and v
    may have fewer heads than q."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)


# -- trials: the private op on a tiny case against the portable op --------------------------------

def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def _trial(fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> Decision:
    """Run ``fn`` (returning ours, portable); on only if it runs and agrees within ``TOLERANCE``."""
    try:
        got, expected = fn()
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as error:
        return Decision(False, f"trial failed: {str(error).splitlines()[0][:120]}")
    error = _relative_error(got, expected)
    if got.shape != expected.shape or not error <= TOLERANCE[dtype]:
        return Decision(False, f"trial differs from the portable op (relative error {error:.1e})")
    return Decision(True, f"trial matches to {error:.0e}")


def _tiny_case(dtype: torch.dtype, rows: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=generator).to(dtype)
    weight = torch.randn(48, 64, generator=generator).to(dtype)
    return x, weight, torch.randn(48, generator=generator).to(dtype)


def onednn_supported(dtype: torch.dtype) -> bool:
    """What the build and CPU say of oneDNN products in ``dtype`` (no call made): x86, built with
    oneDNN, and for bf16 the ISA oneDNN needs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT, as it checks)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def int8_supported() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def flash_attention_supported() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def trial_onednn_linear(dtype: torch.dtype = torch.float32) -> Decision:
    x, weight, bias = _tiny_case(dtype)
    return _trial(lambda: (onednn_linear(x, weight, bias), F.linear(x, weight, bias)), dtype)


def trial_onednn_transposed() -> Decision:
    """The backward passes multiply by transposed views, which oneDNN reads in place."""
    x, weight, _ = _tiny_case(torch.float32, rows=9)
    grad = torch.randn(9, 48)
    return _trial(lambda: (onednn_linear(grad, weight.t()), grad @ weight), torch.float32)


@functools.cache
def _onednn_fp32_trials() -> Decision:
    """Both fp32 trials, run once for the two shape classes that share them."""
    trial = trial_onednn_linear()
    return trial_onednn_transposed() if trial else trial


def trial_split_linear() -> Decision:
    """One row and five, through a weight split in two."""
    one, weight, bias = _tiny_case(torch.float32, rows=1)
    five, _, _ = _tiny_case(torch.float32, rows=5)
    return _trial(lambda: (torch.cat([split_linear(x, weight, bias, parts=2) for x in (one, five)]),
                           torch.cat([F.linear(x, weight, bias) for x in (one, five)])), torch.float32)


def trial_pack(dtype: torch.dtype) -> Decision:
    x, weight, _ = _tiny_case(dtype, rows=1)
    return _trial(lambda: (onednn_linear(x, pack(weight)), F.linear(x, weight)), dtype)


def trial_int8_linear() -> Decision:
    x, weight, _ = _tiny_case(torch.bfloat16, rows=3)
    weight_int8 = torch.randint(-127, 128, (48, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scale = torch.rand(48, generator=torch.Generator().manual_seed(2)).add(0.5).to(torch.bfloat16) / 127
    return _trial(lambda: (int8_linear(x, weight_int8, scale),
                           F.linear(x.float(), weight_int8.float() * scale.float()[:, None])), torch.bfloat16)


def trial_int4_linear() -> Decision:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=generator).to(torch.bfloat16)
    codes = torch.randint(0, 16, (48, 64), generator=generator)
    scale = torch.rand(2, 48, generator=generator).add(0.5) / 16
    zero = torch.randn(2, 48, generator=generator) / 8
    weight = (codes.float() - 8).view(48, 2, 32) * scale.t()[:, :, None] + zero.t()[:, :, None]
    scale_and_zero = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)
    return _trial(lambda: (int4_linear(x, pack_int4(codes), 32, scale_and_zero),
                           F.linear(x.float(), weight.view(48, 64))), torch.bfloat16)


def trial_flash_attention_with_lse() -> Decision:
    """Grouped heads against the scores written out, outputs and log-sum-exps: causal (a row
    against itself) and not (every row's queries against a longer prefix), as scoring calls it."""
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 7, 16, generator=generator)
    k, v = (torch.randn(1, 2, 11, 16, generator=generator) for _ in range(2))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        got, expected = [], []
        for causal, keys in ((False, 11), (True, 7)):
            out, lse = flash_attention_with_lse(q, k[:, :, :keys], v[:, :, :keys], causal=causal)
            scores = q @ k[:, :, :keys].repeat_interleave(2, 1).transpose(-1, -2) / 4
            if causal:
                scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
            got += [out.flatten(), lse.flatten()]
            expected += [(scores.softmax(-1) @ v[:, :, :keys].repeat_interleave(2, 1)).flatten(),
                         scores.logsumexp(-1).flatten()]
        return torch.cat(got), torch.cat(expected)
    return _trial(both, torch.float32)


# -- measurements: the private op against the portable one, in a shape class ----------------------

def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _speedup(candidate: Callable[[], object], portable: Callable[[], object], rounds: int = 7) -> float:
    """How many times faster ``candidate`` runs than ``portable``: medians of alternating calls after a warm-up."""
    candidate(), portable()
    times = [(_seconds(candidate), _seconds(portable)) for _ in range(rounds)]
    return statistics.median(t[1] for t in times) / statistics.median(t[0] for t in times)


def _measured_speedup(path: str, setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]],
                      rounds: int = 7) -> float:
    """How many times faster the candidate runs than the portable op, as measured once per machine
    (``kernel_cache``): every process on it then chooses alike. ``setup`` makes the pair (candidate,
    portable) to time, and is called only when the machine has no measurement yet."""
    return kernel_cache.cached_speedup(cpu_description(), path, lambda: _speedup(*setup(), rounds=rounds))


def _measured(path: str, setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]],
              threshold: float = MIN_SPEEDUP, rounds: int = 7) -> Decision:
    """On if the candidate measured (``_measured_speedup``, over ``rounds``) at least ``threshold`` faster."""
    speedup = _measured_speedup(path, setup, rounds)
    return Decision(speedup >= threshold, f"{speedup:.2f}x the portable op")


def _block_shapes(config: LLaMAConfig) -> tuple[tuple[int, int], ...]:
    """One block's weight shapes [out, in]: wq, wk, wv, wo, w1, w3, w2."""
    dim, hidden = config.dim, config.ffn_hidden_dim
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    return (q, dim), (kv, dim), (kv, dim), (dim, q), (hidden, dim), (hidden, dim), (dim, hidden)


def _matrix_case():
    """Training's products, as a step makes them: 680 rows (4 sequences of 170 positions, the mean
    of ``train.py``'s Alpaca batches) through two blocks' weights of the default model (28 MB, more
    than a 2-core share of the last-level cache), each weight twice: forward (x @ W.T) and backward
    (the gradient @ W, through the transposed view ``linear.py`` passes). One timing is 28 products,
    about 100 ms on 2 cores. A single 1024 x 1024 product measured anything from 1.17x to 1.50x
    MKL's rate from one process to the next on a 2-core Zen 4 where this case measured 1.09-1.19x,
    and whole training steps 1.09x. Values do not change either kernel's speed: filled, not drawn."""
    shapes = _block_shapes(LLaMAConfig.from_name("smollm2-135m"))
    weights = [torch.full(shape, 0.5) for _ in range(2) for shape in shapes]
    rows = {size: torch.full((680, size), 0.5) for shape in shapes for size in shape}
    return rows, weights


def _shape_case(out_features: int, in_features: int):
    """One row through weights of one shape in turn, about ``STREAMED_BYTES`` of them (32 at most):
    decoding, whose weights stream from memory, not from the last-level cache. Their values do not
    change the speed of either kernel, so they are filled, not drawn."""
    count = max(1, min(32, STREAMED_BYTES // max(1, 4 * out_features * in_features)))
    weights = [torch.full((out_features, in_features), 0.5) for _ in range(count)]
    return torch.full((1, in_features), 0.5), weights


@dataclass(frozen=True)
class VectorKernel:
    """The kernel chosen for few-row fp32 products through weights of one shape, and why."""

    name: str  # "mkl" (F.linear, the portable op), "onednn" or "split"
    function: Callable[..., torch.Tensor]
    reason: str


def vector_kernel(out_features: int, in_features: int) -> VectorKernel:
    """The kernel for fp32 products of a few rows (decoding) through an [out, in] weight: oneDNN's
    or ``split_linear`` where one measured at least ``MIN_SHAPE_SPEEDUP`` times MKL's rate for that
    shape (the faster of the two), else MKL's ``F.linear``. Measured per shape, as the one-row
    kernels trade places with it: on a 2-core Zen 3, oneDNN read SmolLM2's 960 x 576 to
    49,152 x 576 weights 1.5-2.0x faster than MKL and its 576 x 576 and 576 x 1,536 ones 0.9x as
    fast, and the split read every one of them 1.2-1.7x faster. Decided once per process and shape."""
    shape = (out_features, in_features)
    if shape not in _VECTOR_KERNELS:
        parts = math.gcd(out_features, torch.get_num_threads())
        candidates = {"onednn": onednn_linear, "split": functools.partial(split_linear, parts=parts)}
        speeds, reasons = {}, []
        for name, function in candidates.items():
            gate = decision(f"{name}_fp32_vector")
            if name == "split" and gate and parts < 2:
                gate = Decision(False, f"{out_features} outputs do not split over {torch.get_num_threads()} threads")
            if not gate:
                reasons.append(f"{name} off ({gate.reason})")
                continue

            def setup(function=function):
                x, weights = _shape_case(out_features, in_features)
                return lambda: [function(x, w) for w in weights], lambda: [F.linear(x, w) for w in weights]
            speeds[name] = _measured_speedup(f"{name}_fp32_vector {out_features}x{in_features}", setup)
            reasons.append(f"{name} {speeds[name]:.2f}x")
        best = max(speeds, key=speeds.get, default=None)
        chosen = best if best is not None and speeds[best] >= MIN_SHAPE_SPEEDUP else "mkl"
        _VECTOR_KERNELS[shape] = VectorKernel(chosen, candidates.get(chosen, F.linear),
                                              ", ".join(reasons) + (" the portable op" if speeds else ""))
    return _VECTOR_KERNELS[shape]


#: ``vector_kernel``'s choices in this process, by weight shape.
_VECTOR_KERNELS: dict[tuple[int, int], VectorKernel] = {}


def _vector_case(dtype: torch.dtype):
    """One row through eight 2048 x 1024 weights in turn (callers go round them 4 times per timing):
    decoding, whose weights stream from memory or the last-level cache."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(2048, 1024, generator=generator).to(dtype) for _ in range(8)]
    return torch.randn(1, 1024, generator=generator).to(dtype), weights


@functools.cache
def decision(path: str) -> Decision:
    """The process-wide decision for one path (see ``PATHS``)."""
    if path not in PATHS:
        raise KeyError(f"unknown CPU kernel path {path!r}; expected one of {', '.join(PATHS)}")
    if not enabled():
        return Decision(False, f"{SWITCH}=0")
    if path == "split_fp32_vector":
        if torch.get_num_threads() < 2:
            return Decision(False, "one thread")
        trial = trial_split_linear()
        return Decision(True, f"{trial.reason}; measured per weight shape") if trial else trial
    if path in ("onednn_fp32_matrix", "onednn_fp32_vector"):
        if not onednn_supported(torch.float32):
            return Decision(False, "no oneDNN for this CPU or build")
        trial = _onednn_fp32_trials()
        if not trial:
            return trial
        if path == "onednn_fp32_vector":  # measured per weight shape: vector_kernel
            return Decision(True, f"{trial.reason}; measured per weight shape")

        def matrix():
            rows, weights = _matrix_case()
            return (lambda: [(onednn_linear(rows[w.shape[1]], w), onednn_linear(rows[w.shape[0]], w.t()))
                             for w in weights],
                    lambda: [(F.linear(rows[w.shape[1]], w), F.linear(rows[w.shape[0]], w.t())) for w in weights])
        # Named for what is timed: a speed cached by an older version (one forward product) is no answer.
        # 11 rounds: the margin is small, and single rounds on a shared 2-core VM spread by 10-30%.
        return _measured(f"{path} block", matrix, MIN_MATRIX_SPEEDUP, rounds=11)
    if path in ("packed_fp32", "packed_bf16"):
        dtype = torch.float32 if path == "packed_fp32" else torch.bfloat16
        if not onednn_supported(dtype):
            return Decision(False, f"oneDNN has no {str(dtype).removeprefix('torch.')} products on this CPU or build")
        trial = trial_pack(dtype)
        if not trial:
            return trial
        # The plain side as sampling runs it, decided first (on unfilled stand-ins of the timed
        # shapes): a measurement may not start inside another.
        plain = linear_function(torch.empty(1, 1024, dtype=dtype), torch.empty(2048, 1024, dtype=dtype))
        # Kept per plain kernel: a speed measured against another one (an older version's) is no answer.
        against = vector_kernel(2048, 1024).name if dtype is torch.float32 else "mkl"

        def packed_and_plain():
            x, weights = _vector_case(dtype)
            packed = [pack(w) for w in weights]
            return (lambda: [onednn_linear(x, p) for p in packed * 4],
                    lambda: [plain(x, w) for w in weights * 4])
        return _measured(f"{path} against {against}", packed_and_plain)
    if path == "flash_attention_lse":
        if not flash_attention_supported():
            return Decision(False, "this PyTorch has no CPU flash-attention kernel")
        return trial_flash_attention_with_lse()
    if path == "int4_matmul":
        return trial_int4_linear() if int4_supported() else Decision(False, "this PyTorch has no int4 CPU kernel")
    if not int8_supported():  # int8_matmul
        return Decision(False, "this PyTorch has no int8 weight kernel")
    return trial_int8_linear()


#: Every path, with what it does when on.
PATHS = {
    "onednn_fp32_matrix": "fp32 products of many rows (training, prompts) through oneDNN instead of MKL",
    "onednn_fp32_vector": "fp32 products of a few rows (decoding) through oneDNN instead of MKL",
    "split_fp32_vector": "fp32 products of a few rows (decoding) split over the threads (split_linear)",
    "packed_fp32": "sampling with fp32 weights reordered by oneDNN (generate.py pack_weights)",
    "packed_bf16": "sampling with bf16 weights reordered by oneDNN (generate.py pack_weights)",
    "int8_matmul": "quantize=int8 products by PyTorch's int8 weight kernel (else dequantised per call)",
    "int4_matmul": "quantize=int4 products by PyTorch's int4 CPU kernel (else dequantised per call)",
    # No timing: the alternative writes every score out, where this kernel is the one public SDPA runs.
    "flash_attention_lse": "benchmark scoring's split attention by the CPU flash kernel (else scores written out)",
}


def linear_function(x: torch.Tensor, weight: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The kernel for ``x @ weight.T`` (+ bias), called as ``F.linear`` is: for plain fp32 CPU
    tensors outside compile and autocast, the one measured fastest for products of as many rows
    (and, for a few rows, through a weight of that shape); ``F.linear`` for everything else.
    Called for every product, so kept cheap."""
    if not (x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
        return F.linear
    if x.numel() > VECTOR_ROWS * x.shape[-1]:
        return onednn_linear if decision("onednn_fp32_matrix") else F.linear
    kernel = vector_kernel(weight.shape[0], weight.shape[1])
    return F.linear if kernel.name == "split" and not weight.is_contiguous() else kernel.function


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_function`` sends ``x @ weight.T`` to ``onednn_linear``."""
    return linear_function(x, weight) is onednn_linear


def packs(dtype: torch.dtype) -> bool:
    """Whether sampling weights of ``dtype`` on CPU should be oneDNN-packed."""
    path = {torch.float32: "packed_fp32", torch.bfloat16: "packed_bf16"}.get(dtype)
    return path is not None and bool(decision(path))


def _cpuinfo() -> dict[str, str]:
    """The first CPU's model name, family, model and flags from /proc/cpuinfo (empty where unreadable)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "cpu family", "model", "flags") and key.strip() not in info:
                    info[key.strip()] = value.strip()
                if len(info) == 4:
                    break
    except OSError:
        pass
    return info


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as the kernel reports them (``avx2``, ``avx512_bf16``, ...), or None
    where they cannot be read (not Linux, or not x86)."""
    flags = _cpuinfo().get("flags")
    return set(flags.split()) if flags else None


def cpu_description() -> dict[str, object]:
    """The CPU and the settings that pick kernels: for logs and every benchmark's JSON."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vp2intersect", "amx_bf16",
                       "avx_ne_convert") if f in flags]
    return {
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "isa_flags": isa,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "environment": {k: os.environ[k] for k in (SWITCH, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                   "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS") if k in os.environ},
    }


def report() -> dict[str, object]:
    """``cpu_description`` plus every path's decision and the weight shapes decided so far, for a
    benchmark's JSON (made after its runs, so that the shapes it used are in it)."""
    return {**cpu_description(),
            "kernel_paths": {p: {"on": d.on, "reason": d.reason} for p, d in ((p, decision(p)) for p in PATHS)},
            "fp32_vector_shapes": {f"{out}x{in_}": {"kernel": k.name, "reason": k.reason}
                                   for (out, in_), k in sorted(_VECTOR_KERNELS.items())}}


def describe() -> str:
    """One log line: the CPU, and which fast paths are on (making every decision now)."""
    cpu = cpu_description()
    paths = ", ".join(f"{p} {'on' if decision(p) else 'off'} ({decision(p).reason})" for p in PATHS)
    return (f"[cpu kernels: {cpu['cpu']} ({cpu['torch_cpu_capability']}, {cpu['threads']} threads); "
            f"{paths}]")
