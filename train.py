"""Fine-tune a LLaMA with LoRA: ``python train.py experiment=quickstart`` (``-m`` to sweep)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llm_lightning.cli import exit_on_user_error
from llm_lightning.training import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(train)(cfg)


if __name__ == "__main__":
    main()
