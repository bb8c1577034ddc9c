"""Configs that cannot run here (no GPU) still compose and build the objects they describe."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from llm_lightning import settings
from tests.train_runner import REPO


def compose_train(*overrides: str, config: str = "train"):
    """The config as the task receives it, ``${hydra:...}`` interpolations resolvable."""
    settings.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_fills_the_typed_settings(experiment):
    typed = settings.to_settings(compose_train(f"experiment={experiment}"))
    assert isinstance(typed, settings.TrainSettings) and typed.lora.config.r == typed.lora.r
    assert isinstance(typed.data, settings.DataSettings) and isinstance(typed.model, settings.ModelSettings)


def test_generate_settings_sampling_and_device():
    typed = settings.to_settings(compose_train("temperature=0.7", "top_p=0.9", "stop=[\"###\"]", config="generate"))
    assert typed.sampling.temperature == 0.7 and typed.sampling.stop == ("###",)
    assert typed.torch_device.type == "cpu" and typed.model.preset == "smollm2-135m"


def test_fsdp_is_fsdp2_with_adapter_only_checkpoints():
    from llm_lightning.fsdp import FSDP2Strategy

    cfg = compose_train("trainer=fsdp", "trainer.num_nodes=2")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and not strategy._save_distributed_checkpoint
    assert cfg.trainer.precision == "bf16-true" and cfg.trainer.num_nodes == 2
    # One checkpointing switch: the model's flag; an FSDP policy as well would recompute every block twice.
    assert set(cfg.trainer.strategy) == {"_target_"}


def test_course_recipe_settings():
    cfg = compose_train("experiment=seed_llama2_7b")
    assert cfg.model.preset == "llama2-7b" and cfg.model.activation_checkpointing
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.targets)) == (16, 32, 0.05, ["wq", "wv"])
    assert cfg.data.limit == 200 and cfg.data.path.endswith("stanford_alpaca/main/alpaca_data.json")
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.precision == "bf16-true"  # bf16 base, fp32 adapters
    assert cfg.trainer.accumulate_grad_batches > 1 and cfg.trainer.accelerator == "gpu"


def test_optimizer_is_a_partial():
    import functools

    import torch

    optimizer = instantiate(compose_train().optimizer)
    assert isinstance(optimizer, functools.partial) and optimizer.func is torch.optim.AdamW
