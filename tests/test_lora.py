"""LoRA: exact counts, step-0 equality, freezing, merging, partial loads, and parity with PEFT."""

from __future__ import annotations

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, load_pretrained
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import (
    LoRAConfig, LoRALinear, apply_lora, assert_only_lora_keys_missing, count_parameters,
    load_lora_state_dict, lora_disabled, lora_state_dict, merge_lora, unmerge_lora,
)


def tiny(**overrides) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", **overrides)).eval()


def randomize_lora(model: LLaMA, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_llama2_7b_r16_wq_wv_counts():
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig.from_name("llama2-7b"))
    apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, targets=("wq", "wv")))
    trainable, total = count_parameters(model)
    assert trainable == 8_388_608
    assert total == 6_738_415_616 + 8_388_608
    assert f"{trainable / 6_738_415_616:.2%}" == "0.12%"


def test_all_shorthand_and_unknown_target():
    assert LoRAConfig(targets=("all",)).targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    assert LoRAConfig(targets=("wq", "all", "output")).targets[-1] == "output"
    with pytest.raises(ValueError, match="unknown LoRA target 'q_proj'"):
        LoRAConfig(targets=("q_proj",))


def test_step_zero_reproduces_base_exactly():
    model = tiny()
    input_ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        base = model(input_ids)
        apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("all",)))
        adapted = model(input_ids)
    assert torch.equal(base, adapted)
    assert isinstance(model.layers[0].attention.wq, LoRALinear)
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)


def test_only_lora_parameters_are_trainable():
    model = apply_lora(tiny(), LoRAConfig(r=4, targets=("wq", "wv", "output")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)
    assert len(trainable) == 2 * (2 * 2 + 1)  # a and b for wq, wv in two layers, plus output
    assert set(lora_state_dict(model)) == trainable


def test_base_checkpoint_loads_with_only_lora_keys_missing():
    base_state = tiny().state_dict()
    adapted = apply_lora(tiny(), LoRAConfig(r=4, targets=("all",)))
    result = adapted.load_state_dict(base_state, strict=False)
    assert result.missing_keys and all("lora_" in k for k in result.missing_keys)
    assert_only_lora_keys_missing(result.missing_keys, result.unexpected_keys)
    with pytest.raises(ValueError, match="missing non-LoRA"):
        assert_only_lora_keys_missing([*result.missing_keys, "norm.weight"], [])


def test_merge_equals_unmerged_forward_and_unmerge_restores():
    model = apply_lora(tiny(), LoRAConfig(r=4, alpha=8, targets=("all",)))
    randomize_lora(model)
    base_weight = model.layers[0].attention.wq.weight.detach().clone()
    input_ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        unmerged = model(input_ids)
        merge_lora(model)
        merged = model(input_ids)
        unmerge_lora(model)
        again = model(input_ids)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (again - unmerged).abs().max().item() < 1e-5
    assert torch.allclose(model.layers[0].attention.wq.weight, base_weight, atol=1e-6)


def test_lora_disabled_gives_the_base_output():
    base = tiny()
    adapted = apply_lora(tiny(), LoRAConfig(r=4, targets=("all",)))
    randomize_lora(adapted)
    input_ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        tuned = adapted(input_ids)
        with lora_disabled(adapted):
            assert torch.equal(adapted(input_ids), base(input_ids))
        assert torch.equal(adapted(input_ids), tuned)
    assert not torch.equal(tuned, base(input_ids))


def test_adapter_state_dict_round_trip():
    source = apply_lora(tiny(), LoRAConfig(r=4, targets=("wq", "wv")))
    randomize_lora(source)
    target = apply_lora(tiny(), LoRAConfig(r=4, targets=("wq", "wv")))
    load_lora_state_dict(target, lora_state_dict(source))
    input_ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(source(input_ids), target(input_ids))
    with pytest.raises(ValueError, match="adapter does not fit"):
        load_lora_state_dict(apply_lora(tiny(), LoRAConfig(r=4, targets=("wq", "wk"))), lora_state_dict(source))


def test_tied_output_target_is_refused():
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tiny(tie_embeddings=True), LoRAConfig(targets=("output",)))


@pytest.mark.kernels
def test_logits_match_peft(tmp_path, tiny_tokenizer_dir):
    """Same base weights and same A/B in PEFT and here give the same logits (q rows permuted for HF)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from llm_lightning import load_pretrained
    from llm_lightning.checkpoints.hf_format import meta_to_hf_name, permute_to_hf
    from tests.conftest import TINY_VOCAB, make_hf_llama, save_hf_dir

    reference = make_hf_llama(n_kv_heads=2)
    directory = save_hf_dir(reference, tmp_path / "hf", tiny_tokenizer_dir)
    model, _ = load_pretrained(directory)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("wq", "wk", "wv", "w2")))
    randomize_lora(model)

    peft_model = get_peft_model(reference, PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    heads = {"wq": 4, "wk": 2}
    peft_state = {}
    for name, tensor in lora_state_dict(model).items():
        module_name, kind = name.rsplit(".", 1)
        hf_module = meta_to_hf_name(module_name + ".weight").removesuffix(".weight")
        layer_kind = module_name.rsplit(".", 1)[-1]
        if kind == "lora_b" and layer_kind in heads:
            tensor = permute_to_hf(tensor, heads[layer_kind])
        suffix = "lora_A.default.weight" if kind == "lora_a" else "lora_B.default.weight"
        peft_state[f"base_model.model.{hf_module}.{suffix}"] = tensor
    result = peft_model.load_state_dict(peft_state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]

    input_ids = torch.randint(0, TINY_VOCAB, (2, 40))
    with torch.no_grad():
        difference = (model(input_ids) - peft_model(input_ids=input_ids).logits).abs().max().item()
    assert difference <= 1e-4


def test_a_bf16_merge_keeps_the_adapter_as_well_as_bf16_products_apart():
    """generate.py merges the adapter into weights of the model's dtype: in bf16 the update is
    rounded into the weight, and must still stay as close to the fp32 adapted model as bf16
    products with the adapter apart do."""
    def adapted(dtype: torch.dtype) -> LLaMA:
        model = load_pretrained(None, dtype=dtype)[0]
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(r=16, alpha=32, targets=("wq", "wv")))
        randomize_lora(model)
        return model.eval()

    ids = torch.tensor([embedded_tokenizer().encode("The lighthouse keeper climbed the stairs and saw")])
    with torch.no_grad():
        fp32 = adapted(torch.float32)
        reference = fp32(ids).log_softmax(-1)
        with lora_disabled(fp32):
            base = fp32(ids).log_softmax(-1)
        bf16 = adapted(torch.bfloat16)
        apart = bf16(ids).float().log_softmax(-1)
        merge_lora(bf16)
        merged = bf16(ids).float().log_softmax(-1)

    def kl_from_reference(log_probs: torch.Tensor) -> float:
        return float((reference.exp() * (reference - log_probs)).sum(-1).mean())

    assert kl_from_reference(base) > 5 * kl_from_reference(apart)  # the adapter matters more than bf16's rounding
    assert kl_from_reference(merged) < 1.5 * kl_from_reference(apart)
