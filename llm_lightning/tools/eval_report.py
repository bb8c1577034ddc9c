"""How every ``evaluate.py`` run reports: a markdown table on stdout, the metrics as JSON, the same
table (and the top-level numbers) to the logger when one is set, then ``results: <JSON path>`` as the
last line, which scripts can rely on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from llm_lightning.tools.train import build_logger


@dataclass
class Table:
    """A column holds one type, or None where a row has no value (wandb checks the types)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        def cell(value: Any) -> str:
            return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

        lines = [self.title, "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def report(results: dict, table: Table, output: str | Path, logger_cfg: DictConfig | None) -> dict:
    print(table.markdown())
    path = Path(output)
    path.write_text(json.dumps(results, indent=2))
    logger = build_logger(logger_cfg)
    if logger:
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        logger.log_metrics({f"eval/{k}": v for k, v in scalars.items()})
        if hasattr(logger, "log_table"):  # wandb
            logger.log_table(key="eval/results", columns=table.columns, data=table.rows)
        logger.finalize("success")
        finish = getattr(logger.experiment, "finish", None)  # wandb's closing lines come before ours
        if callable(finish):
            finish()
    print(f"results: {path}")
    return results
