"""Low-rank adapters (LoRA, DoRA) for the LLaMA's linear layers, on a dense or NF4 base.

``LoRALinear`` *is* an ``nn.Linear`` (same ``weight``/``bias`` names), so a base checkpoint loads
into an adapted model unchanged and the adapter adds only ``lora_a``/``lora_b`` (and DoRA's
``lora_magnitude``). ``apply_lora`` swaps the targeted layers in place, sharing the base weight
tensors (no copy); with ``base_quant="nf4"`` it first stores the blocks' linear weights in 4 bits
(QLoRA, ``nf4.py``). B starts at zero, so an adapted model's output at step 0 is exactly the base
model's.

DoRA (Liu et al. 2024) splits the adapted weight into a learned magnitude per output row and a
direction: W' = m * (W + s B A) / ||W + s B A||, norms over each row's inputs, the norm treated
as a constant in backward (the paper's section 4.3, as PEFT does). m starts at ||W||, so step 0
is again the base model. With dropout, the dropped input feeds the low-rank path only, inside the
rescaling: y = m / ||W + s B A|| * (x W^T + s dropout(x) A^T B^T). PEFT instead computes a second
base product on the dropped input; without dropout (and in eval) the two are the same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning import nf4
from llm_lightning.dropout import Dropout
from llm_lightning.linear import Linear, linear

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
FFN_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = (*ATTENTION_TARGETS, *FFN_TARGETS, "output")
# "all" means every linear layer inside the blocks, as PEFT's "all-linear": not the output head.
SHORTHANDS = {"all": ATTENTION_TARGETS + FFN_TARGETS, "attention": ATTENTION_TARGETS, "ffn": FFN_TARGETS}


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=("wq", "wv"))
    dora: bool = False
    base_quant: str | None = None  # "nf4": the frozen base's block weights in 4 bits (QLoRA)

    def __post_init__(self) -> None:
        if self.base_quant is not None and self.base_quant not in nf4.BASE_QUANTS:
            raise ValueError(f"base_quant={self.base_quant}: expected null or one of {', '.join(nf4.BASE_QUANTS)}")
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        expanded: list[str] = []
        for target in ([self.targets] if isinstance(self.targets, str) else self.targets):
            if target in SHORTHANDS:
                expanded.extend(SHORTHANDS[target])
            elif target in ALL_TARGETS:
                expanded.append(target)
            else:
                choices = ", ".join([*ALL_TARGETS, *SHORTHANDS])
                raise ValueError(f"unknown LoRA target {target!r}; expected any of {choices}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(expanded)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, settings: Mapping[str, object]) -> LoRAConfig:
        """The config a checkpoint recorded (``dora``/``base_quant`` absent from older ones mean off)."""
        return cls(r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"],
                   targets=tuple(settings["targets"]), dora=bool(settings.get("dora", False)),
                   base_quant=settings.get("base_quant"))


class LoRALinear(Linear):
    """y = x W^T (+ b) + (alpha / r) * dropout(x) A^T B^T, with A [r, in] and B [out, r]; with
    ``dora``, rescaled per output row by m / ||W + s B A|| (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float, dropout: float,
                 bias: bool = False, dora: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.scaling = r, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.dora = dora
        if dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()  # cheaper masks on CPU
        self.merged = False
        self.disabled = False  # see lora_disabled(): the base model's output, without unmerging
        #: Set while sampling computes this layer inside a stacked product (``fused_projections``),
        #: which reads the weight alone: the adapter may then not be switched on, merged or unmerged.
        self.stacked = False
        self._merge_scale: torch.Tensor | None = None  # DoRA: the row scale a merge multiplied by
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Kaiming-uniform A as nn.Linear initialises its weight, zero B: the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        if self.dora and self.weight.device.type != "meta":
            with torch.no_grad():  # m = ||W||: the rescaling starts at 1
                self.lora_magnitude.copy_(self.adapted_weight_norm())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig, lora_dtype: torch.dtype | None = None) -> LoRALinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        weight = linear.weight
        dtype = lora_dtype or nf4.logical_dtype(weight)
        adapted = cls(linear.in_features, linear.out_features, r=config.r, alpha=config.alpha,
                      dropout=config.dropout, bias=False, dora=config.dora, device="meta", dtype=dtype)
        adapted.weight = weight
        adapted.bias = linear.bias
        for name in ("lora_a", "lora_b", "lora_magnitude") if config.dora else ("lora_a", "lora_b"):
            setattr(adapted, name, nn.Parameter(torch.empty_like(getattr(adapted, name), device=weight.device)))
        if weight.device.type != "meta":
            adapted.reset_lora_parameters()
        return adapted.train(linear.training)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling

    @torch.no_grad()
    def adapted_weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, in fp32; DoRA treats it as a constant. Expanded as
        ||W||^2 + 2 s <W, B A> + s^2 ||B A||^2 with <W_i, (B A)_i> = B_i . (A W^T)_i, so no
        out x in matrix is formed besides the (dequantized) weight itself."""
        a, b, s = self.lora_a.float(), self.lora_b.float(), self.scaling
        dense = nf4.dequantize(self.weight)
        weight_sq = torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32).square()
        cross = (b * F.linear(self.lora_a.to(dense.dtype), dense).t().float()).sum(1)
        update_sq = ((b @ (a @ a.t())) * b).sum(1)
        return (weight_sq + 2 * s * cross + s * s * update_sq).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return linear(x, self.weight, self.bias)
        out = linear(x, self.weight)
        # Scaling the rank-r intermediate rather than the output touches r instead of out_features columns.
        down = F.linear(self.lora_dropout(x).to(self.lora_a.dtype), self.lora_a) * self.scaling
        out = out + F.linear(down, self.lora_b).to(out.dtype)
        if self.dora:
            out = out * (self.lora_magnitude / self.adapted_weight_norm().to(self.lora_magnitude.dtype)).to(out.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight. An NF4 weight becomes the dense matrix it stands for,
        for good: ``unmerge`` leaves it dense (merging is for export and sampling, never training)."""
        if self.disabled:
            raise RuntimeError("cannot merge a LoRA layer while it is disabled")
        self._refuse_if_stacked("merge")
        if self.merged:
            return
        if nf4.is_nf4(self.weight):
            self.weight = nn.Parameter(nf4.dequantize(self.weight), requires_grad=False)
        if self.dora:
            self._merge_scale = self.lora_magnitude / self.adapted_weight_norm()
            merged = (nf4.dequantize(self.weight, self._merge_scale.dtype) + self.delta_weight()) \
                * self._merge_scale[:, None]
            self.weight.copy_(merged.to(self.weight.dtype))
        else:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._refuse_if_stacked("unmerge")
        if self.dora:
            scale = self._merge_scale[:, None]
            self.weight.copy_((self.weight.to(scale.dtype) / scale - self.delta_weight()).to(self.weight.dtype))
        else:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def _refuse_if_stacked(self, action: str) -> None:
        if self.stacked:
            raise RuntimeError(f"cannot {action} a LoRA adapter while sampling computes its layer in a stacked "
                               "product (fused_projections); expected the change before or after sampling")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}{', dora' if self.dora else ''}"


def _target_modules(model: nn.Module, targets: Iterable[str]) -> Iterable[tuple[nn.Module, str]]:
    targets = set(targets)
    for module in model.modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, nn.Linear):
                yield module, child_name


def apply_lora(model: nn.Module, config: LoRAConfig, *, lora_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every targeted linear layer by a LoRALinear, freeze all non-LoRA parameters, return
    the model; with ``config.base_quant``, the blocks' linear weights are first stored in NF4."""
    if "output" in config.targets and getattr(model, "output", True) is None:
        raise ValueError("LoRA target 'output' is impossible for a model with tied input/output embeddings")
    found = list(_target_modules(model, config.targets))
    if not found:
        raise ValueError(f"no linear layers named {', '.join(config.targets)} in the model")
    if config.base_quant == "nf4":
        nf4.quantize_base(model)
    for parent, name in found:
        setattr(parent, name, LoRALinear.from_linear(getattr(parent, name), config, lora_dtype))
    mark_only_lora_trainable(model)
    return model


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRA settings ``model``'s adapted layers were built with (e.g. after loading an adapter)."""
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers")
    layer = next(iter(layers.values()))
    dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
    return LoRAConfig(r=layer.r, alpha=layer.scaling * layer.r, dropout=dropout, targets=tuple(layers),
                      dora=layer.dora, base_quant="nf4" if nf4.base_dtype(model) is not None else None)


LORA_TENSORS = ("lora_a", "lora_b", "lora_magnitude")


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_TENSORS


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_lora_parameter(name))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: megabytes for a 7B model."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}


def load_lora_state_dict(model: nn.Module, adapter: Mapping[str, torch.Tensor]) -> None:
    """Load an adapter into an adapted model; it must hold every LoRA tensor and nothing else."""
    expected = {k for k, _ in model.named_parameters() if is_lora_parameter(k)}
    missing, unexpected = expected - adapter.keys(), adapter.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"adapter does not fit the model: {len(missing)} LoRA tensors missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})"
        )
    result = model.load_state_dict(dict(adapter), strict=False)
    assert_only_base_keys_missing(result.missing_keys, result.unexpected_keys)


def assert_only_lora_keys_missing(missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """After loading base weights into an adapted model, only adapter tensors may be absent."""
    missing, unexpected = list(missing), list(unexpected)
    not_lora = [k for k in missing if not is_lora_parameter(k)]
    if not_lora or unexpected:
        raise ValueError(f"base weights do not fit: missing non-LoRA {not_lora[:3]}, unexpected {unexpected[:3]}")


def assert_only_base_keys_missing(missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """After loading an adapter, only base tensors may be absent."""
    missing, unexpected = list(missing), list(unexpected)
    lora_missing = [k for k in missing if is_lora_parameter(k)]
    if lora_missing or unexpected:
        raise ValueError(f"adapter does not fit: missing LoRA {lora_missing[:3]}, unexpected {unexpected[:3]}")


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (for base-vs-tuned comparisons) without a second copy in memory; blocks nest."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in layers):
        raise RuntimeError("unmerge the adapter before disabling it")
    before = [layer.disabled for layer in layers]  # an enclosing lora_disabled() stays in force
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, before):
            layer.disabled = disabled
    if any(layer.stacked and not layer.disabled for layer in layers):
        # Sampling that began inside this block (a ``stream`` left unfinished) still runs the base
        # weights alone: it would go on answering without the adapter that is now on again.
        raise RuntimeError("lora_disabled() ended while a sampling call that began inside it is still running "
                           "(an unfinished stream?); expected it to enclose the whole sampling call")


def merge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared tensors once (and an NF4 weight's values, not its bytes)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(nf4.numel(p) for p in unique)
