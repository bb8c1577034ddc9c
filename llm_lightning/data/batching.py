"""Batching that keeps resumption deterministic and padding low.

Shuffling depends only on (seed, epoch), every rank takes the same number of batches, and the
sampler can skip the batches a resumed run has already consumed. (Exact gradient accumulation
needs nothing from here: the module divides the gradients by the window's tokens at step time.)

Ranks deal the one global list of batches between them, rank r taking batches r, r + W, ...:
so a step of W ranks sees exactly the batches that one process sees in a step with
``accumulate_grad_batches=W``, and the two train to the same adapter (tested). When the number of
batches is not a multiple of W, the ranks leave the last ones out, where one process would take
a last, shorter step with them.

Given the examples' lengths, batches are grouped by length, as Hugging Face's ``group_by_length``
does: the shuffled order is cut into megabatches of 50 batches, each sorted by length and cut into
batches, and the batches are shuffled again. A batch is padded to its longest example, so this
removes most of the padding while the order stays random at the scale of a megabatch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from llm_lightning.data.encoding import IGNORE_INDEX, Example
from llm_lightning.errors import DataError


class ExampleDataset(Dataset):
    """Encoded examples, indexed by the batch sampler. The list is held, not copied: what is
    updated in it in place (a preference pair's reference log-probabilities) reaches the loader."""

    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class ShuffledBatchSampler(Sampler[list[int]]):
    """Seeded, epoch-dependent batches of ``count`` examples, grouped by length when given lengths."""

    MEGABATCH = 50  # batches per length-sorted group

    def __init__(self, count: int, *, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, lengths: Sequence[int] | None = None) -> None:
        self.count = count
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size = batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0
        # Lightning sets the epoch of ``batch_sampler.sampler`` at every epoch start (as it would for
        # torch's BatchSampler over an index sampler); this sampler is its own index sampler.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; the order depends only on (seed, epoch)."""
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Drop the first ``count`` batches of the next iteration (those consumed before a resume)."""
        self.skip = count

    def state_dict(self, consumed_batches: int) -> dict[str, int]:
        """Where an iteration stands. The caller says how many batches training consumed: a loader
        that prefetches has drawn more from this sampler than the model has seen."""
        return {"epoch": self.epoch, "consumed_batches": consumed_batches, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the next iteration starts at the first batch not yet consumed.
        The count is per rank, so it means the same only with as many ranks as wrote it."""
        saved = state.get("world_size", 1)  # checkpoints from before ranks were recorded: one
        if saved != self.world_size:
            raise DataError(f"the run being resumed trained on {saved} ranks, this one has {self.world_size}: "
                            f"its place in the data would be lost; resume with {saved} "
                            "(trainer.devices x trainer.num_nodes)")
        epoch, consumed = state["epoch"], state["consumed_batches"]
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        self.set_epoch(epoch)
        self.skip_batches(consumed)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.count))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.count, generator=generator).tolist()

    def _grouped_by_length(self, indices: list[int]) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch + 1)
        span = self.batch_size * self.MEGABATCH
        batches = []
        for start in range(0, len(indices), span):
            ordered = sorted(indices[start:start + span], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def batches(self) -> list[list[int]]:
        """This rank's batches: every ``world_size``-th of the global list, the same number on every
        rank (the global list's last ``len % world_size`` batches are left out)."""
        order = self._order()
        if self.shuffle and self.lengths is not None:
            batches = self._grouped_by_length(order)
        else:
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches[self.rank:len(self) * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator, so the batches (and the skip of a resume) are read at the first next(), not
        # at iter(): under trainer=fsdp Lightning builds the iterator before it restores the data state.
        batches = self.batches()[self.skip:]
        self.skip = 0
        yield from batches

    def __len__(self) -> int:
        return -(-self.count // self.batch_size) // self.world_size


def evaluation_batches(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's share of an evaluation set, in order: no example dropped or repeated, and the same
    number of batches on every rank (under FSDP every forward is a collective all ranks must join).
    The set is cut into a multiple of ``world_size`` batches whose sizes differ by one at most, and
    dealt out. A set too small for that (fewer examples than batches) is evaluated whole on every
    rank: the token-weighted mean synchronised across ranks is then the same, W times over."""
    batches = -(-count // batch_size)
    total = -(-batches // world_size) * world_size  # rounded up to a multiple of the ranks
    if world_size == 1 or count < total or not count:
        return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    sizes = [count // total + (i < count % total) for i in range(total)]
    starts = [0, *itertools.accumulate(sizes)]
    return [list(range(starts[i], starts[i + 1])) for i in range(rank, total, world_size)]


def collate(items: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded label positions are IGNORE_INDEX by position,
    never by comparing token ids with pad_id, so a real EOS is always supervised."""
    longest = max(len(example.input_ids) for example in items)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(items):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "labels": labels}
