"""QLoRA (an NF4 base) and DoRA: the codes, gradient parity, merging, the dry run's memory model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, nf4
from llm_lightning.dry_run import estimate
from llm_lightning.linear_cross_entropy import CHUNK_BYTES
from llm_lightning.loss import model_nll
from llm_lightning.lora import (
    LoRAConfig, LoRALinear, apply_lora, count_parameters, load_lora_state_dict, lora_config_of, lora_disabled,
    lora_state_dict,
)
from llm_lightning.precision import Precision
from tests.conftest import make_hf_llama, save_hf_dir
from tests.train_runner import REPO, run_tool, run_train, summary

pytest.importorskip("bitsandbytes")

# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023, appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def tiny(seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig.from_name("tiny")).eval()


def randomize_adapters(model: LLaMA, seed: int = 1) -> None:
    """Nonzero B and magnitudes off ||W||, so every adapter tensor shapes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif name.endswith("lora_magnitude"):
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))


def test_nf4_codes_are_qlora_normal_float_with_double_quantized_scales():
    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(0))
    quantized = nf4.quantize(weight)
    assert nf4.is_nf4(quantized) and not quantized.requires_grad
    assert nf4.numel(quantized) == weight.numel() and nf4.logical_dtype(quantized) == torch.float32
    dense = nf4.dequantize(quantized)
    blocks, stored = weight.view(-1, nf4.BLOCK_SIZE), dense.view(-1, nf4.BLOCK_SIZE)
    # Each block's largest magnitude is a ±1 code, so the stored scale is the block's largest |value|.
    scale = stored.abs().amax(dim=1, keepdim=True)
    true_scale = blocks.abs().amax(dim=1, keepdim=True)
    assert ((scale - true_scale).abs() / true_scale).max() < 0.01  # the scale itself is stored in 8 bits
    levels = stored / scale
    assert (levels[..., None] - NF4_LEVELS).abs().min(dim=-1).values.max() < 1e-6
    # ... and each weight got the level nearest to it (codes are chosen with the exact scale).
    nearest = NF4_LEVELS[(blocks / true_scale)[..., None].sub(NF4_LEVELS).abs().argmin(dim=-1)]
    assert (levels - nearest).abs().max() < 1e-5
    # QLoRA's storage: half a byte a weight, an int8 scale per 64, an fp32 scale per 256 scales.
    state = quantized.quant_state
    stored_bytes = quantized.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4
    assert stored_bytes == weight.numel() * nf4.bytes_per_weight()
    assert 0.07 < (dense - weight).abs().mean() < 0.08  # NF4's error on unit Gaussians


def _loss(model: LLaMA, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(input_ids).flatten(0, 1), input_ids.roll(-1, 1).flatten())


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_gradients_equal_lora_on_the_dequantized_base(dora):
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("all",), dora=dora)
    quantized = apply_lora(tiny(), replace(config, base_quant="nf4"))
    randomize_adapters(quantized)
    reference = tiny()
    nf4.dequantize_base(nf4.quantize_base(reference))  # the values the codes stand for, stored dense
    apply_lora(reference, config)
    load_lora_state_dict(reference, lora_state_dict(quantized))
    assert lora_config_of(quantized).base_quant == "nf4" and lora_config_of(reference).base_quant is None
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = [_loss(m.train(), input_ids) for m in (quantized, reference)]
    assert abs(losses[0].item() - losses[1].item()) < 1e-5
    for loss in losses:
        loss.backward()
    trained = dict(reference.named_parameters())
    for name, parameter in quantized.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, trained[name].grad, atol=1e-5, rtol=0), name


def test_qlora_stores_block_weights_in_four_bits_and_counts_them_as_weights():
    model = tiny()
    total = count_parameters(model)[1]
    apply_lora(model, LoRAConfig(r=4, targets=("wq", "wv"), base_quant="nf4"))
    layer = model.layers[0]
    for linear in (layer.attention.wq, layer.attention.wo, layer.feed_forward.w2):
        assert nf4.is_nf4(linear.weight)
    assert not nf4.is_nf4(model.output.weight) and model.tok_embeddings.weight.dtype == torch.float32
    assert isinstance(layer.attention.wq, LoRALinear) and layer.attention.wq.weight is not None
    assert count_parameters(model) == (4 * 2 * ((64 + 64) + (64 + 32)), total + 4 * 2 * ((64 + 64) + (64 + 32)))


def test_dora_starts_at_the_base_and_merges_exactly():
    model = tiny()
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids)
        apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("all",), dora=True))
        layer = model.layers[0].attention.wq
        assert torch.allclose(layer.lora_magnitude, torch.linalg.vector_norm(layer.weight, dim=1), rtol=1e-6)
        assert (model(input_ids) - base).abs().max() < 1e-5  # m = ||W||, B = 0: the base model
        randomize_adapters(model)
        adapted = model(input_ids)
        assert (adapted - base).abs().max() > 1e-2
        direct = torch.linalg.vector_norm(layer.weight + layer.delta_weight(), dim=1)
        assert torch.allclose(layer.adapted_weight_norm(), direct, rtol=1e-6)
        with lora_disabled(model):
            assert (model(input_ids) - base).abs().max() < 1e-5
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.merge()
        assert (model(input_ids) - adapted).abs().max() < 1e-5
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.unmerge()
        for name, tensor in model.state_dict().items():
            assert (tensor - weights[name]).abs().max() < 1e-5, name


def test_dora_on_an_nf4_base_merges_into_the_dequantized_weight():
    model = tiny()
    apply_lora(model, LoRAConfig(r=4, targets=("wq", "w2"), dora=True, base_quant="nf4"))
    randomize_adapters(model)
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids)
        model.layers[0].attention.wq.merge()
        assert not nf4.is_nf4(model.layers[0].attention.wq.weight)
        assert (model(input_ids) - adapted).abs().max() < 1e-5


def test_dry_run_sizes_qlora_and_dora():
    config = LLaMAConfig.from_name("llama2-7b")
    lora = LoRAConfig(r=16, alpha=32, targets=("all",))
    precision = Precision.parse("bf16-mixed")
    sizes = {name: estimate(config, variant, precision=precision, batch_size=4, seq_len=512, checkpointing=True)
             for name, variant in (("lora", lora), ("qlora", replace(lora, base_quant="nf4")),
                                   ("dora", replace(lora, dora=True)))}
    linear_weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    embeddings_and_head = 2 * 32000 * 4096
    # QLoRA: 4-bit block weights, the head and norms in bf16 (frozen: no fp32 master needed), the
    # token embeddings in fp32 (the residual stream's start).
    base = sizes["qlora"]["base"]
    expected = (linear_weights * nf4.bytes_per_weight() + 32000 * 4096 * 4 + (32000 * 4096 + 65 * 4096) * 2
                + sizes["qlora"]["trainable"] * 4)
    assert sizes["qlora"]["memory"]["weights"] == pytest.approx(expected)
    assert base - linear_weights == embeddings_and_head + 65 * 4096
    assert sum(sizes["qlora"]["memory"].values()) <= 6 * 2**30
    assert sizes["lora"]["memory"]["weights"] == base * 4 + sizes["lora"]["trainable"] * 4
    # DoRA adds one magnitude per output row of each adapted layer
    assert sizes["dora"]["trainable"] - sizes["lora"]["trainable"] == 32 * (4096 * 4 + 11008 * 2 + 4096)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny HF base saved by transformers, and a DoRA adapter trained by train.py on its NF4 codes
    (test_export.py exports one like it)."""
    root = tmp_path_factory.mktemp("qlora_dora")
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), root / "base", tiny_tokenizer_dir)
    run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", "data.max_seq_length=128", "data.val_size=6",
              "lora.targets=[wq,wk,wv,w2]", "lora.r=4", "lora.dora=true", "lora.base_quant=nf4",
              "optimizer.lr=3e-2", "scheduler.warmup_steps=0", run_dir=root / "run")
    saved = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["lora_config"]["dora"] and saved["lora_config"]["base_quant"] == "nf4"
    return base, root / "run"


def test_evaluate_and_generate_put_the_adapter_back_on_its_nf4_base(trained, tmp_path):
    base, run = trained
    output = tmp_path / "eval.json"
    run_tool("evaluate", f"ckpt_path={run}", f"model.source={base}", "max_new_tokens=2", f"output={output}")
    # the held-out loss training measured last, reproduced: the same NF4 codes under the same adapter
    tuned = json.loads(output.read_text())["perplexity"]
    assert math.log(tuned) == pytest.approx(summary(run)["val_loss_end"], rel=1e-5)
    printed = run_tool("generate", f"ckpt_path={run}", f"model.source={base}", "prompt=Hi", "max_new_tokens=4")
    assert printed.stdout.strip()


def test_dry_run_estimate_matches_the_measured_cpu_peak_of_qlora(tmp_path):
    """The embedded model, QLoRA at the quickstart's LoRA settings and a full 4 x 256 batch:
    ``benchmarks/qlora_memory.py`` measures the weights' and training's resident memory."""
    output = tmp_path / "memory.json"
    subprocess.run([sys.executable, "benchmarks/qlora_memory.py", "--variants", "qlora", "--output", str(output)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    row = json.loads(output.read_text())["rows"][0]
    assert abs(row["estimate_error"]) <= 0.15, row


@pytest.mark.parametrize("targets, dropout, dora", [(("wq", "wv"), 0.05, False), (("all",), 0.05, True),
                                                     (("wq", "w2"), 0.0, False), (("all",), 0.0, False)])
def test_dry_run_activations_are_the_tensors_autograd_keeps(targets, dropout, dora):
    """Every tensor a LoRA step saves for its backward, counted by a saved-tensors hook, against the
    estimate less the loss's logit chunks (which are buffers, not saved tensors)."""
    config = LLaMAConfig.from_name("smollm2-135m", n_layers=2)
    lora = LoRAConfig(r=8, targets=targets, dropout=dropout, dora=dora)
    torch.manual_seed(0)
    model = LLaMA(config)
    apply_lora(model, lora)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model_nll(model, ids, ids)
    estimated = estimate(config, lora, precision=Precision.parse("32-true"), batch_size=2, seq_len=64,
                         checkpointing=False, device_type="cpu")
    chunks = 2 * min(2 * 64 * config.vocab_size * 4, CHUNK_BYTES["cpu"])
    assert sum(kept.values()) == pytest.approx(estimated["memory"]["activations"] - chunks, rel=0.02)


def test_an_nf4_base_is_requantized_from_the_dtype_training_quantized_it_in():
    """Training under bf16-mixed quantizes a bf16 base; a tool that loads it in fp32 gets the same codes."""
    trained_in_bf16 = nf4.quantize_base(tiny().to(torch.bfloat16))
    reloaded = nf4.quantize_base(tiny(), torch.bfloat16)
    assert nf4.base_dtype(trained_in_bf16) == nf4.base_dtype(reloaded) == torch.bfloat16
    for (name, layer), (_, again) in zip(nf4.quantized_layers(trained_in_bf16), nf4.quantized_layers(reloaded)):
        assert torch.equal(layer.weight.data, again.weight.data), name
        assert torch.equal(nf4.dequantize(layer.weight), nf4.dequantize(again.weight)), name


def test_qlora_under_bf16_mixed_keeps_fp32_embeddings_and_records_the_quantized_dtype(tmp_path):
    run_train("model=tiny", "logger=none", "data.max_seq_length=64", "trainer.max_steps=2",
              "trainer.limit_val_batches=0", "trainer.precision=bf16-mixed", "lora.base_quant=nf4", run_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["base_quant_dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())  # fp32 adapters
    assert "weights                    " in run_train("model=tiny", "dry_run=true", "lora.base_quant=nf4",
                                                      run_dir=tmp_path / "dry").stdout


def test_qlora_quickstart_learns_nine_tenths_of_what_the_fp32_quickstart_learns(tmp_path):
    """The embedded model and the bundled sample, as README's main command trains it, with and
    without an NF4 base: the held-out loss must fall at least 90% as far with one."""
    drops = {}
    for name, extra in (("fp32", ()), ("nf4", ("lora.base_quant=nf4",))):
        run_train("experiment=quickstart", "logger=none", "~callbacks.samples", *extra, run_dir=tmp_path / name,
                  timeout=900)
        result = summary(tmp_path / name)
        drops[name] = result["val_loss_start"] - result["val_loss_end"]
    assert drops["fp32"] > 0.4 and drops["nf4"] >= 0.9 * drops["fp32"], drops
