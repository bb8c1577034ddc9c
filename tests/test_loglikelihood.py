"""Continuation log-likelihoods: prefix sharing, deduplication and batching change nothing but speed."""

from __future__ import annotations

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.loglikelihood import continuation_logprobs


def one_by_one(model: LLaMA, context: list[int], continuation: list[int], max_length: int) -> tuple[float, bool]:
    """One full forward per request, no cache: the definition the scorer must reproduce."""
    tokens = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]]))[0, -len(continuation):].log_softmax(-1)
    targets = torch.tensor(continuation)
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def model_and_requests():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=97)).eval()
    generator = torch.Generator().manual_seed(1)
    shots = torch.randint(0, 97, (40,), generator=generator).tolist()  # a shared "few-shot" prefix
    requests = []
    for question in range(5):
        stem = shots + torch.randint(0, 97, (3 + 2 * question,), generator=generator).tolist()
        for choice in (5, 6, 7, 8):  # four one-token choices on the same context
            requests.append((stem, [choice]))
        requests.append((stem, torch.randint(0, 97, (4,), generator=generator).tolist()))  # a longer one
    longer = shots + torch.randint(0, 97, (12,), generator=generator).tolist()
    for question in range(3):  # rows sharing more than the kept prefix: it serves them cut
        requests.append((longer + [question], [9]))
    requests.append(([3], [4, 5, 6]))  # a one-token context, nothing shared
    requests.append(([3, 4], [5, 6]))  # the same inputs as the request above, split elsewhere
    # The model's own greedy continuation, so that is_greedy is true at least once.
    with torch.no_grad():
        greedy = model(torch.tensor([shots]))[0, -1].argmax().item()
    requests.append((shots, [greedy]))
    return model, requests


@pytest.mark.kernels  # the split attention runs the CPU flash kernel or its portable form
@pytest.mark.parametrize("batch_size, min_shared_prefix, head_chunk", [(1, 10_000, 512), (4, 8, 3), (64, 1, 512)])
def test_scores_equal_one_full_forward_per_request(model_and_requests, batch_size, min_shared_prefix, head_chunk,
                                                   monkeypatch):
    model, requests = model_and_requests
    monkeypatch.setattr("llm_lightning.loglikelihood.HEAD_CHUNK", head_chunk)  # chunks that split rows
    expected = [one_by_one(model, c, t, model.config.max_seq_len) for c, t in requests]
    scored = continuation_logprobs(model, requests, batch_size=batch_size, min_shared_prefix=min_shared_prefix)
    assert [g for _, g in scored] == [g for _, g in expected] and any(g for _, g in scored)
    for (got, _), (want, _) in zip(scored, expected):
        assert got == pytest.approx(want, abs=1e-5)
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_over_long_requests_keep_their_last_max_length_tokens(model_and_requests):
    model, requests = model_and_requests
    scored = continuation_logprobs(model, requests, batch_size=8, max_length=24, min_shared_prefix=4)
    for (got, greedy), (context, continuation) in zip(scored, requests):
        want, want_greedy = one_by_one(model, context, continuation, 24)
        assert got == pytest.approx(want, abs=1e-5) and greedy == want_greedy


def test_empty_context_is_refused(model_and_requests):
    model, _ = model_and_requests
    with pytest.raises(ValueError, match="at least one context"):
        continuation_logprobs(model, [([], [1, 2])])
