"""What every entry point shares: Hydra composes ``conf/<tool>.yaml``, and a user mistake ends the
program with one line on stderr and exit code 2, never a traceback or a hang.

Mistakes come in two kinds. Those Hydra finds while composing (an unknown key, a value of the
wrong type, a missing config option) it would print over several lines, so ``hydra_tool`` asks
Hydra to raise them (``HYDRA_FULL_ERROR`` while composing) and folds each into one line. Those
found by our own checks are ``UserFacingError``s. ``HYDRA_FULL_ERROR=1`` set by the user keeps
every traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from llm_lightning import settings
from llm_lightning.errors import UserFacingError

T = TypeVar("T")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FULL_ERROR = "HYDRA_FULL_ERROR"

#: A hint added to a composition error whose text contains the key.
HINTS = {"Could not find 'model/": "model= picks a preset from conf/model; point at weights with model.source=PATH"}


#: Detail lines Hydra and OmegaConf add that say nothing the first line does not.
NOISE = ("full_key:", "object_type=", "reference_type=")


def one_line(error: BaseException) -> str:
    """An exception and its cause as one line, Hydra's detail lines folded in or dropped."""
    parts = []
    while error is not None and len(parts) < 3:
        lines = str(error).split("Config search path:")[0].splitlines()
        text = " ".join(line.strip() for line in lines if line.strip() and not line.strip().startswith(NOISE))
        if text and text not in parts:
            parts.append(text)
        error = error.__cause__
    line = ": ".join(parts) or "invalid settings"
    hints = [hint for key, hint in HINTS.items() if key in line]
    return "; ".join([line, *hints])


def exit_with(error: BaseException) -> None:
    """``error: <one line>`` on stderr, exit code 2."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(2)


def user_wants_tracebacks() -> bool:
    return os.environ.get(FULL_ERROR) == "1"


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Print ``error: <one line>`` and exit 2 on a UserFacingError (traceback with HYDRA_FULL_ERROR=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFacingError as error:
            if user_wants_tracebacks():
                raise
            exit_with(error)

    return wrapper


def hydra_tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], None]]:
    """Turn ``task(cfg)`` into a ``main()`` that composes ``conf/<config_name>.yaml`` (with the command
    line's overrides, ``--help``, ``-m`` sweeps) and reports every user mistake in one line."""
    settings.register()

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
        @functools.wraps(task)
        def run_task(cfg: DictConfig) -> None:
            _restore(saved)  # composition is over: the task (and any process it starts) sees the user's choice
            exit_on_user_error(task)(cfg)

        saved: dict[str, str | None] = {}
        hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(run_task)

        def main() -> None:
            saved[FULL_ERROR] = os.environ.get(FULL_ERROR)
            os.environ[FULL_ERROR] = "1"  # Hydra then raises composition errors instead of printing them
            try:
                hydra_main()
            except (HydraException, OmegaConfBaseException) as error:  # the task's own are caught inside it
                if saved[FULL_ERROR] == "1":
                    raise
                exit_with(error)
            finally:
                _restore(saved)

        return main

    return decorate


def _restore(saved: dict[str, str | None]) -> None:
    if saved.get(FULL_ERROR) is None:
        os.environ.pop(FULL_ERROR, None)
    else:
        os.environ[FULL_ERROR] = saved[FULL_ERROR]

