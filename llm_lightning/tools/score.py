"""``python -m llm_lightning.score ckpt_path=<reward model .ckpt | run dir | last> input=FILE [output=scores.jsonl]``

Scores answers with a reward model (``stage=rm``). The input is JSON or JSONL, one of:
- answers: ``{"prompt": str | messages, "response": str}``, or a conversation (OpenAI messages,
  ShareGPT, Alpaca) whose last turn is the assistant's, which is the answer scored;
- preference pairs (any format ``data=preferences`` reads): both answers are scored, and the
  pairwise accuracy (chosen above rejected) is reported.

Answers are rendered with the template the model was trained with and truncated as training
truncates pairs (``pair_encoding.py``). One JSON line per record goes to ``output`` (``score``, or
``chosen`` and ``rejected``); the last line printed is ``results: <output>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from llm_lightning.adapter import load_reward_model, trained_template
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.data.conversations import Conversation, RecordError, parse_records, to_conversations
from llm_lightning.data.pair_encoding import encode_pair
from llm_lightning.data.preferences import PreferencePair, prompt_conversation, to_pairs
from llm_lightning.data.records import read_rows
from llm_lightning.errors import DataError
from llm_lightning.loading import load_base_model
from llm_lightning.prompts import get_template
from llm_lightning.reward_model import score_sequences
from llm_lightning.settings import ScoreSettings, to_settings


def _prompt_response(row: dict) -> PreferencePair:
    response = row.get("response")
    if not isinstance(response, str):
        raise RecordError(f"field 'response' is a {type(response).__name__}, expected a string")
    return PreferencePair(prompt_conversation(row), response, response)


def _answered(conversation: Conversation, index: int, source: str) -> PreferencePair:
    *prompt, answer = conversation.messages
    if answer["role"] != "assistant" or not prompt:
        raise DataError(f"{source}: record {index} ends with a {answer['role']} turn; expected the assistant's "
                        "answer to an earlier turn, which is what gets scored")
    return PreferencePair(Conversation(tuple(prompt), conversation.tools, format=conversation.format),
                          answer["content"], answer["content"])


def read_scoring_input(rows: list, source: str) -> tuple[list[PreferencePair], bool]:
    """(what to score as pairs, whether they are real pairs); a single answer is a pair of it with itself."""
    first = rows[0] if rows else {}
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        return to_pairs(rows, source)[0], True
    if isinstance(first, dict) and "response" in first:
        answers, _ = parse_records(rows, source, _prompt_response, kind="prompt/response format", skip_invalid=False)
        return answers, False
    conversations, _ = to_conversations(rows, source, need_answer=False)
    return [_answered(c, i, source) for i, c in enumerate(conversations)], False


def score(cfg: DictConfig) -> Path:
    settings: ScoreSettings = to_settings(cfg)
    rows, source = read_rows(settings.input)
    items, paired = read_scoring_input(rows, source)
    if not items:
        raise DataError(f"{source}: nothing to score")
    model, tokenizer = load_base_model(settings.model)
    path = resolve_checkpoint(settings.ckpt_path, name=settings.name)
    head, checkpoint = load_reward_model(model, tokenizer, path, force=settings.force_adapter_load)
    model.eval()
    template = trained_template(checkpoint, tokenizer) or get_template("auto", tokenizer)
    saved = (checkpoint.get("PreferenceDataModule") or {}).get("settings", {})
    max_seq_length = settings.max_seq_length or saved.get("max_seq_length") or 2048
    encoded = [encode_pair(item, tokenizer, template, max_seq_length=max_seq_length) for item in items]
    too_short = [i for i, e in enumerate(encoded) if e is None]
    if too_short:
        raise DataError(f"{source}: record {too_short[0]} does not fit max_seq_length={max_seq_length} "
                        "(half of it for the prompt); raise max_seq_length")
    sequences = [e.chosen for e in encoded] + ([e.rejected for e in encoded] if paired else [])
    scores = score_sequences(model, head, sequences, tokenizer.pad_id, settings.batch_size)
    if paired:
        lines = [{"chosen": c, "rejected": r} for c, r in zip(scores, scores[len(encoded):])]
        wins = sum(line["chosen"] > line["rejected"] for line in lines)
        print(f"{len(lines)} pairs from {source}: chosen scored higher in {wins} ({wins / len(lines):.3f})")
    else:
        lines = [{"score": s} for s in scores]
        print(f"{len(lines)} answers from {source}: mean score {sum(scores) / len(scores):.4f}")
    output = Path(settings.output)
    output.write_text("".join(json.dumps({"index": i, **line}) + "\n" for i, line in enumerate(lines)))
    print(f"results: {output}")
    return output
