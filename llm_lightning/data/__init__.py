"""Instruction and chat data: records as conversations, encoding with supervised assistant turns, batching, audit."""

from llm_lightning.data.conversations import Conversation
from llm_lightning.data.encoding import IGNORE_INDEX, Example, encode_conversation
from llm_lightning.data.records import BUNDLED_SAMPLE, read_records
from llm_lightning.errors import DataError

__all__ = ["AlpacaDataModule", "BUNDLED_SAMPLE", "Conversation", "DataError", "Example", "IGNORE_INDEX",
           "encode_conversation", "read_records"]


def __getattr__(name: str):
    """``AlpacaDataModule`` on first use: it imports Lightning (seconds), which sampling never needs."""
    if name == "AlpacaDataModule":
        from llm_lightning.data.datamodule import AlpacaDataModule

        return AlpacaDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
