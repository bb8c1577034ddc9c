"""Log-likelihoods of continuations given contexts: the scorer behind MMLU and the lm-eval backend.

Benchmark requests repeat themselves. The four choices of a question share their whole context,
and every question of an MMLU subject opens with the same five exemplars (hundreds to thousands
of tokens). So rows are deduplicated (one forward per distinct input sequence, however many
targets read it), grouped by the prefix they share and batched by length within a group. A batch
whose rows share a long enough prefix runs it once, at batch size 1, into the KV cache. The
prefix is kept while the following batches still start with it. The rows' own tokens are packed
end to end, without padding, and attend to the prefix and to their own row (``segments.py``).
The head and log-softmax run only at the positions that predict a continuation token.

Over-long rows keep their last ``max_length`` inputs, as lm-eval's ``hf`` backend does.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llm_lightning.model import LLaMA
from llm_lightning.segments import PrefixSegments
from llm_lightning.tokenizer import Tokenizer

MIN_SHARED_PREFIX = 32  # below this, a second forward costs more than the prefix it would save
HEAD_CHUNK = 512  # positions whose vocabulary-wide logits exist at once (about 100 MB for 49k tokens)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: the context's trailing spaces join the
    continuation, and the continuation is what encoding both adds to encoding the context alone, so
    a token spanning the boundary (" A" after "Answer:") is tokenized as it is in the whole text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


@torch.no_grad()
def continuation_logprobs(model: LLaMA, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 8, max_length: int | None = None,
                          min_shared_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
    (context ids, continuation ids) request; every context holds at least one token."""
    max_length = max_length or model.config.max_seq_len
    rows: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}  # inputs -> (request, continuation)s
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError("every request needs at least one context and one continuation token")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}")
        tokens = (list(context) + list(continuation))[-(max_length + 1):]
        rows.setdefault(tuple(tokens[:-1]), []).append((index, tuple(continuation)))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    kept: tuple[int, ...] | None = None  # the tokens whose keys and values the KV cache holds
    try:
        for batch in _batches(list(rows), batch_size, min_shared_prefix):
            reads = [rows[inputs] for inputs in batch]
            longest_read = [max(len(continuation) for _, continuation in row_reads) for row_reads in reads]
            shared, kept = _shared_prefix(model, batch, longest_read, kept, min_shared_prefix)
            for index, score in _score_batch(model, batch, shared, reads):
                results[index] = score
    finally:
        model.clear_kv_cache()
    return results


def _batches(rows: list[tuple[int, ...]], batch_size: int, min_shared_prefix: int) -> list[list[tuple[int, ...]]]:
    """Rows sorted so that shared prefixes are neighbours, cut into groups whose neighbours share at
    least ``min_shared_prefix`` tokens (so that every row of a group shares them), then batched
    within each group by length: no batch mixes two prefixes, and little of a batch is padding."""
    ordered = sorted(rows)
    groups, start = [], 0
    for end in range(1, len(ordered) + 1):
        if end == len(ordered) or _common_prefix_length([ordered[end - 1], ordered[end]]) < min_shared_prefix:
            groups.append(sorted(ordered[start:end], key=len))
            start = end
    return [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


def _common_prefix_length(rows: list[tuple[int, ...]]) -> int:
    shortest = min(len(row) for row in rows)
    length = 0
    while length < shortest and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def _shared_prefix(model: LLaMA, batch: list[tuple[int, ...]], reads_per_row: list[int],
                   kept: tuple[int, ...] | None, min_shared_prefix: int) -> tuple[int, tuple[int, ...] | None]:
    """(how many leading tokens of the batch's rows the KV cache serves, the prefix kept in it).

    The batch's prefix stops before the first position a row reads. The kept prefix serves, cut
    to what the batch shares with it, unless running the batch's own longer prefix once costs less
    than every row running the difference; the key and value of a position depend only on the
    tokens up to it, so a cut prefix is exact, and the whole one stays kept.
    """
    limit = min(_common_prefix_length(batch), min(len(row) - n for row, n in zip(batch, reads_per_row)))
    if kept is not None:
        common = _common_prefix_length([kept[:limit], batch[0][:limit]])
        if common >= min_shared_prefix and (limit - common) * len(batch) <= limit:
            return common, kept
    if limit < min_shared_prefix:
        return 0, kept
    tokens = batch[0][:limit]
    weight = model.tok_embeddings.weight
    model.setup_kv_cache(1, limit, dtype=weight.dtype, device=weight.device)
    model.hidden_states(torch.tensor([tokens], device=weight.device))
    return limit, tokens


def _score_batch(model: LLaMA, batch: list[tuple[int, ...]], shared: int,
                 reads: list[list[tuple[int, tuple[int, ...]]]]) -> list[tuple[int, tuple[float, bool]]]:
    """(request, score) for every read of the batch's rows. The rows' tokens after the ``shared``
    ones the KV cache holds are packed into one sequence (``segments.PrefixSegments``). Each read's
    continuation sits in the last positions of its row; the head runs on those positions only,
    HEAD_CHUNK at a time, so the vocabulary-wide logits never exist for a whole batch at once."""
    device = model.tok_embeddings.weight.device
    own = [row[shared:] for row in batch]
    segments = PrefixSegments(shared, tuple(len(tokens) for tokens in own))
    ids = torch.tensor([[token for tokens in own for token in tokens]], device=device)
    hidden = model.hidden_states(ids, segments=segments)[0]

    read_positions, pair_position, pair_token, pair_owner = [], [], [], []
    row_end = 0
    for i, (tokens, row_reads) in enumerate(zip(own, reads)):
        longest = max(len(continuation) for _, continuation in row_reads)
        first = len(read_positions)
        row_end += len(tokens)
        read_positions += range(row_end - longest, row_end)
        for owner, (_, continuation) in enumerate(row_reads):
            pair_position += range(first + longest - len(continuation), first + longest)
            pair_token += continuation
            pair_owner += [(i, owner)] * len(continuation)
    picked = hidden[torch.tensor(read_positions, device=device)]
    positions = torch.tensor(pair_position, device=device)
    tokens = torch.tensor(pair_token, device=device)
    target_logit = torch.empty(len(positions), device=device)
    log_norm = torch.empty(len(picked), device=device)
    greedy = torch.empty(len(picked), dtype=torch.long, device=device)
    for start in range(0, len(picked), HEAD_CHUNK):
        logits = model.logits(picked[start:start + HEAD_CHUNK]).float()
        log_norm[start:start + HEAD_CHUNK] = logits.logsumexp(-1)
        greedy[start:start + HEAD_CHUNK] = logits.argmax(-1)
        inside = (positions >= start) & (positions < start + HEAD_CHUNK)
        target_logit[inside] = logits[positions[inside] - start, tokens[inside]]
    logprobs = (target_logit - log_norm[positions]).tolist()
    hits = (greedy[positions] == tokens).tolist()
    scores: dict[tuple[int, int], tuple[float, bool]] = {}
    for key, logprob, hit in zip(pair_owner, logprobs, hits):
        total, all_hit = scores.get(key, (0.0, True))
        scores[key] = (total + logprob, all_hit and hit)
    return [(reads[i][owner][0], score) for (i, owner), score in scores.items()]
