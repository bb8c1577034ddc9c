"""Errors that reach users as one line: what went wrong, where, and what was expected.

Entry points (train.py, generate.py, the ``python -m`` tools) catch ``UserFacingError`` and
print its message instead of a traceback; everything else is a bug and keeps its traceback.
"""


class UserFacingError(Exception):
    """A problem with the user's input (files, settings), not with this code."""


class CheckpointError(UserFacingError):
    """A checkpoint is missing, unreadable, unsafe, or disagrees with its config."""


class TokenizerError(UserFacingError):
    """A tokenizer is missing, unreadable, or does not fit the model."""


class SettingError(UserFacingError):
    """A setting has a value outside what it accepts (a number out of range, an unknown name)."""


class DataError(UserFacingError):
    """The dataset is missing, malformed, or empty."""
