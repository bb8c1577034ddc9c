"""Base vs fine-tuned: response perplexity and ROUGE-L: ``python evaluate.py ckpt_path=last``."""

from llm_lightning.cli import hydra_tool
from llm_lightning.tools.evaluate import evaluate

main = hydra_tool("evaluate")(evaluate)

if __name__ == "__main__":
    main()
