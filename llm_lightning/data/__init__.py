"""Instruction and chat data: records as conversations, encoding with supervised assistant turns, batching, audit."""

from llm_lightning.data.conversations import Conversation
from llm_lightning.data.encoding import IGNORE_INDEX, Example, encode_conversation
from llm_lightning.data.records import BUNDLED_SAMPLE, read_records
from llm_lightning.errors import DataError

__all__ = ["AlpacaDataModule", "PreferenceDataModule", "BUNDLED_SAMPLE", "Conversation", "DataError", "Example", "IGNORE_INDEX",
           "encode_conversation", "read_records"]


def __getattr__(name: str):
    """The data modules on first use: they import Lightning (seconds), which sampling never needs."""
    if name == "AlpacaDataModule":
        from llm_lightning.data.datamodule import AlpacaDataModule

        return AlpacaDataModule
    if name == "PreferenceDataModule":
        from llm_lightning.data.preference_datamodule import PreferenceDataModule

        return PreferenceDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
