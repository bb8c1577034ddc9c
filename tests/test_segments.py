"""Packed rows after a shared cached prefix attend exactly as each row alone would, on the fast
path and on the portable one (the suite runs this file with LLM_LIGHTNING_FAST_KERNELS=0 too)."""

from __future__ import annotations

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, cpu_kernels
from llm_lightning.segments import PrefixSegments, attention_with_lse, math_attention_with_lse

pytestmark = pytest.mark.kernels


def written_out(q, k, v, causal):
    """Scores, softmax and log-sum-exp spelled out with the keys repeated for their query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1 << 24, 250])  # 250 scores: chunks of 2 query rows (of 9)
def test_attention_with_lse_equals_the_written_out_scores(causal, chunk, monkeypatch):
    monkeypatch.setattr("llm_lightning.segments.MATH_SCORES_PER_CHUNK", chunk)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 8, generator=generator)
    k, v = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    want_out, want_lse = written_out(q, k, v, causal)
    for attend in (attention_with_lse, math_attention_with_lse):
        out, lse = attend(q, k, v, causal=causal)
        torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("prefix_length", [0, 5, 11])
def test_packed_rows_equal_each_row_run_alone(prefix_length, fast, monkeypatch):
    """Hidden states of rows packed after a cut of the cached prefix equal each row's own forward,
    on the flash kernel's path (where cpu_kernels takes it) and on the portable one."""
    if not fast:
        monkeypatch.setattr(cpu_kernels, "decision", lambda path: cpu_kernels.Decision(False, "switched off"))
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=97)).eval()
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 97, (11,), generator=generator).tolist()
    rows = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (1, 6, 3)]
    with torch.no_grad():
        model.setup_kv_cache(1, len(prefix))
        model.hidden_states(torch.tensor([prefix]))  # the whole prefix cached; a cut of it is served
        segments = PrefixSegments(prefix_length, tuple(len(row) for row in rows))
        packed = model.hidden_states(torch.tensor([sum(rows, [])]), segments=segments)[0]
        model.clear_kv_cache()
        alone = [model.hidden_states(torch.tensor([prefix[:prefix_length] + row]))[0, prefix_length:]
                 for row in rows]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_positions_continue_the_prefix_in_every_row():
    assert PrefixSegments(4, (2, 1, 3)).positions().tolist() == [[4, 5, 4, 4, 5, 6]]


def test_segments_refuse_a_cache_shorter_than_their_prefix():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=97)).eval()
    model.setup_kv_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="continue 6 cached positions; the KV cache holds 4"):
        model.hidden_states(torch.tensor([[1, 2, 3]]), segments=PrefixSegments(6, (2, 1)))
