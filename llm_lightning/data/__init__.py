"""Alpaca-format instruction data: records, encoding with prompt masking, batching, audit."""

from llm_lightning.data.datamodule import AlpacaDataModule
from llm_lightning.data.encoding import IGNORE_INDEX, Example, encode_record
from llm_lightning.data.records import BUNDLED_SAMPLE, DataError, Record, read_records

__all__ = ["AlpacaDataModule", "BUNDLED_SAMPLE", "DataError", "Example", "IGNORE_INDEX", "Record",
           "encode_record", "read_records"]
