"""Sample packing: whole examples laid end to end in rows of at most ``max_seq_length`` tokens.

Rows are filled by best-fit decreasing (each example, longest first, goes to the fullest row it
still fits), which leaves little padding, and an example is never split. Each packed row carries
per-token ``document_ids`` and ``positions`` that restart at 0 in every example: the model builds
a block-diagonal causal mask from the ids, so no token attends across examples, and rotary
positions are those the example would have alone. The first token of each example is never a
target (it would be predicted from the previous example), so the loss of a packed row is the sum
of its examples' own losses.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from llm_lightning.data.encoding import IGNORE_INDEX, Example


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose lengths sum to at most ``capacity``
    (best-fit decreasing; deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"an example of {size} tokens does not fit a row of {capacity}")
        slot = bisect_left(room, (size, -1))
        if slot == len(room):
            rows.append([index])
            insort(room, (capacity - size, len(rows) - 1))
        else:
            free, row = room.pop(slot)
            rows[row].append(index)
            insort(room, (free - size, row))
    return rows


def collate_packed(rows: list[list[Example]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """A batch of packed rows, right-padded to the longest: ``input_ids``, ``labels``, and the
    ``positions`` and ``document_ids`` that keep the examples apart (padding is document -1, of its own)."""
    longest = max(sum(len(e.input_ids) for e in row) for row in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), longest)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for document, example in enumerate(row):
            end = start + len(example.input_ids)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start + 1:end] = torch.tensor(example.labels[1:])
            positions[r, start:end] = torch.arange(end - start)
            document_ids[r, start:end] = document
            start = end
        positions[r, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "document_ids": document_ids}
