"""What entry points share: a user mistake ends the program with one line on stderr, not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from llm_lightning.errors import UserFacingError

T = TypeVar("T")


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Print ``error: <message>`` and exit 2 on a UserFacingError (traceback with HYDRA_FULL_ERROR=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFacingError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_settings(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``key=value`` arguments (dotted keys, Hydra-style values) over defaults; an unknown key is an error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    base = OmegaConf.create(defaults)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_cli(argv)))
    except ConfigKeyError as exc:
        raise UserFacingError(
            f"unknown setting ({str(exc).splitlines()[0]}); expected one of {', '.join(defaults)}"
        ) from None
