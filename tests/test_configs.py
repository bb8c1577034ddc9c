"""Configs that cannot run here (no GPU) still compose and build the objects they describe."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.train_runner import REPO


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_fsdp_strategy_wraps_each_transformer_block():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from llm_lightning.model import TransformerBlock

    cfg = compose_train("trainer=fsdp", "trainer.num_nodes=2")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {TransformerBlock}
    assert cfg.trainer.precision == "bf16-true" and cfg.trainer.num_nodes == 2


def test_course_recipe_settings():
    cfg = compose_train("experiment=seed_llama2_7b")
    assert cfg.model.preset == "llama2-7b" and cfg.model.activation_checkpointing
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.targets)) == (16, 32, 0.05, ["wq", "wv"])
    assert cfg.data.limit == 200 and cfg.data.path.endswith("stanford_alpaca/main/alpaca_data.json")
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.accumulate_grad_batches > 1 and cfg.trainer.accelerator == "gpu"


def test_optimizer_is_a_partial():
    import functools

    import torch

    optimizer = instantiate(compose_train().optimizer)
    assert isinstance(optimizer, functools.partial) and optimizer.func is torch.optim.AdamW
