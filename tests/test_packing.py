"""Sample packing is exact: a packed batch gives each example the loss and gradients it has alone."""

from __future__ import annotations

import random

import pytest
import torch

from llm_lightning import LLaMA
from llm_lightning.data.encoding import IGNORE_INDEX, Example
from llm_lightning.data.packing import collate_packed, pack
from llm_lightning.loss import model_nll
from tests.conftest import tiny_lora_model

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths


def test_best_fit_keeps_every_example_once_within_capacity():
    lengths = [random.Random(seed).randint(5, 200) for seed in range(300)]
    rows = pack(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert sum(lengths) / (256 * len(rows)) > 0.95  # little room left over
    assert rows == pack(lengths, 256)
    with pytest.raises(ValueError, match="does not fit"):
        pack([300], 256)


def random_examples(count: int, vocab: int, seed: int = 0) -> list[Example]:
    generator = random.Random(seed)
    examples = []
    for _ in range(count):
        length, prompt = generator.randint(6, 40), generator.randint(1, 5)
        ids = [generator.randrange(vocab) for _ in range(length)]
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt, False))
    return examples


def adapted_tiny() -> LLaMA:
    return tiny_lora_model(vocab_size=512).train()


def lora_grads(model: LLaMA) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def test_packed_loss_and_gradients_equal_the_unpacked_ones():
    model = adapted_tiny()
    examples = random_examples(12, vocab=512)
    alone = []
    for example in examples:
        loss, tokens = model_nll(model, torch.tensor([example.input_ids]), torch.tensor([example.labels]))
        loss.backward()
        alone.append((loss.item(), int(tokens)))
    expected = lora_grads(model)

    rows = pack([len(e.input_ids) for e in examples], 96)
    assert 2 <= len(rows) < len(examples)  # several examples share a row
    batch = collate_packed([[examples[i] for i in row] for row in rows], pad_id=0)
    loss, tokens = model_nll(model, batch["input_ids"], batch["labels"], positions=batch["positions"],
                             document_ids=batch["document_ids"])
    loss.backward()
    packed = lora_grads(model)
    assert int(tokens) == sum(t for _, t in alone)
    assert loss.item() == pytest.approx(sum(l for l, _ in alone), rel=1e-5)
    assert packed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(packed[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)

    with torch.no_grad():  # and each document's own loss, read from the packed logits
        logits = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"])
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(examples[i].input_ids)
                targets = batch["labels"][r, start + 1:start + n]
                nll = torch.nn.functional.cross_entropy(logits[r, start:start + n - 1], targets,
                                                        ignore_index=IGNORE_INDEX, reduction="sum")
                assert nll.item() == pytest.approx(alone[i][0], rel=1e-5, abs=1e-5)
                start += n


def test_without_document_ids_examples_would_attend_across():
    """The check above is sensitive: plain causal attention over the packed row changes the loss."""
    model = adapted_tiny()
    examples = random_examples(6, vocab=512, seed=1)
    batch = collate_packed([examples], pad_id=0)
    with torch.no_grad():
        exact, _ = model_nll(model, batch["input_ids"], batch["labels"], positions=batch["positions"],
                             document_ids=batch["document_ids"])
        leaky, _ = model_nll(model, batch["input_ids"], batch["labels"], positions=batch["positions"])
    assert abs(exact.item() - leaky.item()) > 1e-3
