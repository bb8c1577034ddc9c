"""Take an adapter out: ``python export.py ckpt_path=last format=hf|peft|meta output_dir=DIR``."""

from llm_lightning.cli import hydra_tool
from llm_lightning.tools.export import export

main = hydra_tool("export")(export)

if __name__ == "__main__":
    main()
