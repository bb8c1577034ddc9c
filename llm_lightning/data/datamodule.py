"""``AlpacaDataModule``: instruction or chat records -> conversations -> examples supervised on
the assistant turns -> batches. (Named for its first format; it reads ``messages`` and ShareGPT
files too, see ``data.format``.)"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from llm_lightning.data.audit import DataAudit, audit
from llm_lightning.data.batching import ExampleDataset, ShuffledBatchSampler, collate, evaluation_batches
from llm_lightning.data.conversations import Conversation
from llm_lightning.data.encoding import Example, encode_conversation
from llm_lightning.data.packing import collate_packed, pack
from llm_lightning.data.records import BUNDLED_SAMPLE, download, is_url, read_records
from llm_lightning.errors import DataError
from llm_lightning.prompts import ChatTemplate, get_template
from llm_lightning.tokenizer import Tokenizer


class AlpacaDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        format: str = "auto",
        template: str | None = None,
        max_seq_length: int = 512,
        train_on_inputs: bool = False,
        val_size: float = 0.1,
        limit: int | None = None,
        skip_invalid: bool = False,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
        sha256: str | None = None,
        pad_to_multiple_of: int = 1,
        group_by_length: bool = True,
        packing: bool = False,
    ) -> None:
        super().__init__()
        self.source = str(path) if path else str(BUNDLED_SAMPLE)
        self.tokenizer = tokenizer
        self.format, self.template_name = format, template
        self.max_seq_length, self.train_on_inputs = max_seq_length, train_on_inputs
        self.val_size, self.limit, self.skip_invalid = val_size, limit, skip_invalid
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "llm_lightning"
        self.sha256, self.pad_to_multiple_of = sha256, pad_to_multiple_of
        self.group_by_length, self.packing = group_by_length, packing
        self.train_rows: list[list[int]] = []  # with packing: the examples of each row
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.val_records: list[Conversation] = []
        self.report: DataAudit | None = None
        self._train_sampler: ShuffledBatchSampler | None = None
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: saved in every checkpoint, read back on resume."""
        if self.trainer is None:
            return {}
        state = {"settings": self.settings()}
        if self._train_sampler is not None:
            # Lightning prefetches a batch, so the loop's count, not the sampler's, says what was consumed.
            consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state.update(self._train_sampler.state_dict(consumed_batches=consumed))
        return state

    def settings(self) -> dict:
        """What reproduces this split and encoding (evaluation reads it back from the checkpoint)."""
        return {"path": self.source, "format": self.format, "template": self.template_name,
                "max_seq_length": self.max_seq_length,
                "train_on_inputs": self.train_on_inputs, "val_size": self.val_size, "limit": self.limit,
                "seed": self.seed, "skip_invalid": self.skip_invalid}

    def load_state_dict(self, state: dict) -> None:
        resume = state if state and "consumed_batches" in state else None
        if resume and self._train_sampler is not None:
            # Strategies that restore after setup (trainer=fsdp) built the loader first: position it now.
            self._train_sampler.load_state_dict(resume)
        else:
            self._resume = resume

    def prepare_data(self) -> None:
        """Download a URL source once (rank 0 only, as Lightning calls this)."""
        if is_url(self.source):
            download(self.source, self.cache_dir, self.sha256)

    @property
    def template(self) -> ChatTemplate:
        """The chat template bound to the tokenizer: what training, samples and evaluation render."""
        if self.tokenizer is None or self.template_name is None:
            raise ValueError("AlpacaDataModule needs a tokenizer and setup() before its template")
        return get_template(self.template_name, self.tokenizer)

    def choose_template(self, records: list[Conversation]) -> None:
        """Without ``data.template``: Alpaca records keep the Alpaca template, chat data gets the
        model's own (``auto``)."""
        if self.template_name is None and records:
            self.template_name = "alpaca" if records[0].format == "alpaca" else "auto"

    def _split(self, records: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
        count = len(records)
        n_val = int(round(self.val_size * count)) if self.val_size < 1 else int(self.val_size)
        if self.val_size > 0:
            n_val = max(1, n_val)
        if n_val >= count:
            raise DataError(f"{self.source}: data.val_size={self.val_size} leaves no training records out of {count}")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]

    # -- what a subclass with other records (preference_datamodule.py) replaces --------------------

    def read(self) -> tuple[list[Conversation], int]:
        """(valid records, number skipped as invalid) of the source."""
        return read_records(self.source, format=self.format, skip_invalid=self.skip_invalid,
                            cache_dir=self.cache_dir, sha256=self.sha256)

    @staticmethod
    def as_conversation(record: Conversation) -> Conversation:
        """The conversation a record shows: for the template choice, and the validation samples."""
        return record

    def encode_record(self, record: Conversation, template: ChatTemplate) -> Example | None:
        return encode_conversation(record, self.tokenizer, template, max_seq_length=self.max_seq_length,
                                   train_on_inputs=self.train_on_inputs)

    def audit_examples(self, **counts: int) -> DataAudit:
        return audit(self.train_examples + self.val_examples, self.tokenizer, source=self.source,
                     train=len(self.train_examples), val=len(self.val_examples),
                     packed_rows=len(self.train_rows) if self.packing else None, row_length=self.max_seq_length,
                     **counts)

    # ---------------------------------------------------------------------------------------------

    def encode(self, records: list) -> tuple[list, list, int]:
        """Examples, the records they came from, and how many records were too long to keep."""
        template = self.template
        encoded = [(self.encode_record(r, template), r) for r in records]
        kept = [(e, r) for e, r in encoded if e is not None]
        return [e for e, _ in kept], [r for _, r in kept], len(encoded) - len(kept)

    def setup(self, stage: str | None = None) -> None:
        if self.report is not None:
            return
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer before setup()")
        records, skipped = self.read()
        read = len(records) + skipped
        if self.limit:
            records = records[: self.limit]
        if not records:
            raise DataError(f"{self.source}: no valid records ({read} read, {skipped} skipped as invalid)")
        self.choose_template([self.as_conversation(r) for r in records])
        train_records, val_records = self._split(records)
        self.train_examples, _, train_dropped = self.encode(train_records)
        self.val_examples, val_kept, val_dropped = self.encode(val_records)
        self.val_records = [self.as_conversation(r) for r in val_kept]
        if not self.train_examples:
            raise DataError(
                f"{self.source}: every training example is longer than data.max_seq_length="
                f"{self.max_seq_length} tokens; raise data.max_seq_length"
            )
        if self.packing:
            self.train_rows = pack([len(e.input_ids) for e in self.train_examples], self.max_seq_length)
        self.report = self.audit_examples(records_read=read, records_skipped=skipped,
                                          too_long=train_dropped + val_dropped)
        if self.report.problems:
            raise DataError(f"{self.source} with template {self.template_name}: {self.report.problems[0]}")

    @property
    def loss_terms_per_batch(self) -> float:
        """The mean supervised tokens of a full training batch (of examples, or of packed rows) over
        the epoch: what ``token_weighting=epoch`` divides every step's summed loss by."""
        items = len(self.train_rows) if self.packing else len(self.train_examples)
        return sum(e.supervised_tokens for e in self.train_examples) / items * self.batch_size

    def _collate(self):
        return functools.partial(collate, pad_id=self.tokenizer.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def train_sampler(self) -> ShuffledBatchSampler:
        """Batches of examples (grouped by length when asked), or of packed rows (shuffled)."""
        trainer = self.trainer
        grouped = self.group_by_length and not self.packing
        sampler = ShuffledBatchSampler(
            len(self.train_rows) if self.packing else len(self.train_examples), batch_size=self.batch_size,
            shuffle=True, seed=self.seed, rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            lengths=[len(e) for e in self.train_examples] if grouped else None,
        )
        if not len(sampler):
            raise DataError(f"{self.source}: {sampler.count} training items make fewer batches of "
                            f"data.batch_size={self.batch_size} than there are ranks ({sampler.world_size}); "
                            "lower data.batch_size or use fewer devices")
        if self._resume:
            # Lightning builds (and starts iterating) this loader before it restores the loops of a
            # resumed run, and drops a stateful loader's saved state when configure_optimizers reads
            # estimated_stepping_batches (Lightning issue 20550): position the sampler here instead.
            sampler.load_state_dict(self._resume)
            self._resume = None
        self._train_sampler = sampler
        return sampler

    def train_dataloader(self) -> DataLoader:
        if self.packing:
            items = [[self.train_examples[i] for i in row] for row in self.train_rows]
            collate_fn = functools.partial(collate_packed, pad_id=self.tokenizer.pad_id,
                                           pad_to_multiple_of=self.pad_to_multiple_of)
        else:
            items, collate_fn = self.train_examples, self._collate()
        return DataLoader(ExampleDataset(items), batch_sampler=self.train_sampler(), collate_fn=collate_fn,
                          num_workers=self.num_workers, generator=self._generator())

    def val_dataloader(self) -> DataLoader:
        if not self.val_examples:
            return DataLoader([])
        trainer = self.trainer
        batches = evaluation_batches(len(self.val_examples), self.eval_batch_size,
                                     rank=trainer.global_rank if trainer else 0,
                                     world_size=trainer.world_size if trainer else 1)
        return DataLoader(ExampleDataset(self.val_examples), batch_sampler=batches,
                          collate_fn=self._collate(), num_workers=self.num_workers, generator=self._generator())

    def _generator(self) -> torch.Generator:
        """A private generator: without one, every new DataLoader iterator draws from the global RNG,
        so a resumed run's dropout masks would drift from an uninterrupted run's."""
        return torch.Generator().manual_seed(self.seed)
