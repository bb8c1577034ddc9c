"""Sample from a LLaMA: ``python generate.py prompt="..." [ckpt_path=last] [compare=true] [temperature=0.7]``."""

from llm_lightning.cli import hydra_tool
from llm_lightning.tools.generate import generate

main = hydra_tool("generate")(generate)

if __name__ == "__main__":
    main()
