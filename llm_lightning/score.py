"""Score answers with a reward model: ``python -m llm_lightning.score ckpt_path=last name=rm_quickstart input=FILE``."""

from llm_lightning.cli import hydra_tool
from llm_lightning.tools.score import score

main = hydra_tool("score")(score)

if __name__ == "__main__":
    main()
