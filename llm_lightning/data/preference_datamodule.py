"""``PreferenceDataModule``: preference records -> pairs -> (chosen, rejected) sequences sharing
their prompt -> batches of pairs, each collated as its chosen rows then its rejected rows.

Everything else (template choice, the seeded split, length-grouped batches, resume state, the
audit and its pre-flight checks) is ``AlpacaDataModule``'s.
"""

from __future__ import annotations

import functools

from llm_lightning.data.audit import audit_pairs
from llm_lightning.data.conversations import Conversation
from llm_lightning.data.datamodule import AlpacaDataModule
from llm_lightning.data.pair_encoding import PairExample, collate_pairs, encode_pair
from llm_lightning.data.preferences import PreferencePair, to_pairs
from llm_lightning.data.records import read_rows
from llm_lightning.errors import DataError


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

    def encode(self, pairs: list[PreferencePair]) -> tuple[list[PairExample], list[PreferencePair], int]:
        """Encoded pairs, the records they came from, and how many did not fit."""
        template = self.template
        encoded = [(encode_pair(p, self.tokenizer, template, max_seq_length=self.max_seq_length), p) for p in pairs]
        kept = [(e, p) for e, p in encoded if e is not None]
        return [e for e, _ in kept], [p for _, p in kept], len(encoded) - len(kept)

    def setup(self, stage: str | None = None) -> None:
        if self.report is not None:
            return
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer before setup()")
        if not self.path_given:
            raise DataError("data.path: preference training needs a file of pairs (chosen and rejected answers), "
                            "e.g. data.path=../shared/data/dpo_en_demo_240.json")
        if self.packing or self.train_on_inputs:
            raise DataError(f"data.{'packing' if self.packing else 'train_on_inputs'}=true does not apply to "
                            "preference pairs: each pair is a chosen and a rejected sequence, supervised on the answer")
        rows, path = read_rows(self.source, cache_dir=self.cache_dir, sha256=self.sha256)
        pairs, skipped = to_pairs(rows, path, format=self.format, skip_invalid=self.skip_invalid)
        read = len(pairs) + skipped
        if self.limit:
            pairs = pairs[: self.limit]
        if not pairs:
            raise DataError(f"{self.source}: no valid preference pairs ({read} read, {skipped} skipped as invalid)")
        self.choose_template([p.prompt for p in pairs])
        train_pairs, val_pairs = self._split(pairs)
        self.train_examples, _, train_dropped = self.encode(train_pairs)
        self.val_examples, val_kept, val_dropped = self.encode(val_pairs)
        self.val_records = [pair.with_answer(pair.chosen) for pair in val_kept]
        if not self.train_examples:
            raise DataError(f"{self.source}: no training pair fits in data.max_seq_length={self.max_seq_length} "
                            "tokens; raise data.max_seq_length")
        self.report = audit_pairs(self.train_examples + self.val_examples, self.tokenizer, source=self.source,
                                  records_read=read, records_skipped=skipped, too_long=train_dropped + val_dropped,
                                  train=len(self.train_examples), val=len(self.val_examples))
        if self.report.problems:
            raise DataError(f"{self.source} with template {self.template_name}: {self.report.problems[0]}")

    def _collate(self):
        return functools.partial(collate_pairs, pad_id=self.tokenizer.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
