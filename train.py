"""Fine-tune a LLaMA with LoRA: ``python train.py experiment=quickstart`` (``-m`` to sweep)."""

from llm_lightning.cli import hydra_tool
from llm_lightning.tools.train import train

main = hydra_tool("train")(train)

if __name__ == "__main__":
    main()
