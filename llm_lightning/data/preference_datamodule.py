"""``PreferenceDataModule``: preference records -> pairs -> (chosen, rejected) sequences sharing
their prompt -> batches of pairs, each collated as its chosen rows then its rejected rows.

Everything else (template choice, the seeded split, length-grouped batches, resume state, the
audit and its pre-flight checks) is ``AlpacaDataModule``'s; this class replaces how records are
read, encoded, shown and audited.
"""

from __future__ import annotations

import functools

from llm_lightning.data.audit import DataAudit, audit_pairs
from llm_lightning.data.conversations import Conversation
from llm_lightning.data.datamodule import AlpacaDataModule
from llm_lightning.data.pair_encoding import PairExample, collate_pairs, encode_pair
from llm_lightning.data.preferences import PreferencePair, to_pairs
from llm_lightning.data.records import read_rows
from llm_lightning.errors import DataError
from llm_lightning.prompts import ChatTemplate


class PreferenceDataModule(AlpacaDataModule):
    def __init__(self, path: str | None = None, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.path_given = path is not None
        self.train_examples: list[PairExample] = []
        self.val_examples: list[PairExample] = []
        self.val_records: list[Conversation] = []  # each pair's prompt and chosen answer (for samples)

    @property
    def loss_terms_per_batch(self) -> float:
        """One loss term per pair."""
        return float(self.batch_size)

    def read(self) -> tuple[list[PreferencePair], int]:
        if not self.path_given:
            raise DataError("data.path: preference training needs a file of pairs (chosen and rejected answers), "
                            "e.g. data.path=../shared/data/dpo_en_demo_240.json")
        if self.packing or self.train_on_inputs:
            raise DataError(f"data.{'packing' if self.packing else 'train_on_inputs'}=true does not apply to "
                            "preference pairs: each pair is a chosen and a rejected sequence, supervised on the answer")
        rows, path = read_rows(self.source, cache_dir=self.cache_dir, sha256=self.sha256)
        return to_pairs(rows, path, format=self.format, skip_invalid=self.skip_invalid)

    @staticmethod
    def as_conversation(record: PreferencePair) -> Conversation:
        """The prompt with its chosen answer."""
        return record.with_answer(record.chosen)

    def encode_record(self, record: PreferencePair, template: ChatTemplate) -> PairExample | None:
        return encode_pair(record, self.tokenizer, template, max_seq_length=self.max_seq_length)

    def audit_examples(self, **counts: int) -> DataAudit:
        return audit_pairs(self.train_examples + self.val_examples, self.tokenizer, source=self.source,
                           train=len(self.train_examples), val=len(self.val_examples), **counts)

    def _collate(self):
        return functools.partial(collate_pairs, pad_id=self.tokenizer.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
