"""EleutherAI's lm-evaluation-harness on our models: its command line with our backend registered.

lm-eval's own ``lm_eval`` command finds only the backends it ships, so this is that command line
with ``llm_lightning`` (``lm_eval_backend.py``) registered first::

    python -m llm_lightning.harness --model llm_lightning \\
        --model_args source=PATH,ckpt_path=outputs/run/checkpoints/last.ckpt --tasks hellaswag

In Python, ``import llm_lightning.lm_eval_backend`` registers it for
``lm_eval.simple_evaluate(model="llm_lightning", ...)``. ``evaluate.py harness=lm_eval tasks=[...]``
runs tasks from our configs. lm-eval is an optional extra: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llm_lightning.cli import exit_on_user_error
from llm_lightning.errors import UserFacingError

EVAL_EXTRA = 'pip install -e ".[eval]"'


def lm_eval_backend() -> ModuleType:
    """``lm_eval_backend``, imported (registering the backend), or one line saying how to install lm-eval
    (when it is missing, or a version without the API the backend uses)."""
    try:
        return importlib.import_module("llm_lightning.lm_eval_backend")
    except ImportError as missing:
        if "lm_eval" not in str(missing):
            raise
        raise UserFacingError(f"lm-evaluation-harness could not be imported ({missing}); `{EVAL_EXTRA}` "
                              "installs a supported version") from None


@exit_on_user_error
def main() -> None:
    lm_eval_backend()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
