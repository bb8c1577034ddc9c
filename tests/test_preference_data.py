"""Preference records: every format gives the same pair, bad records one line each, and the two
encoded sequences share their prompt tokens and end the way a finished answer ends."""

from __future__ import annotations

import pytest

from llm_lightning.data.audit import audit_pairs
from llm_lightning.data.pair_encoding import collate_pairs, encode_pair
from llm_lightning.data.preferences import to_pairs
from llm_lightning.errors import DataError
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.prompts import get_template
from tests.conftest import shared_file

HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Capital of France?"}],
            "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon."}}
FLAT = {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "Lyon."}


def test_sharegpt_and_flat_records_give_the_same_pair():
    (sharegpt,), _ = to_pairs([SHAREGPT], "a.json")
    (flat,), _ = to_pairs([FLAT], "b.json")
    assert sharegpt.prompt.messages == flat.prompt.messages == tuple(HISTORY)
    assert (sharegpt.chosen, sharegpt.rejected) == (flat.chosen, flat.rejected) == ("Paris.", "Lyon.")
    (single,), _ = to_pairs([{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}], "c.json")
    assert single.prompt.messages == ({"role": "user", "content": "Capital of France?"},)
    (alpaca,), _ = to_pairs([{"instruction": "Name a colour.", "input": "", "chosen": "Red.", "rejected": "42"}], "d")
    assert alpaca.prompt.format == "alpaca" and alpaca.prompt.messages[0]["instruction"] == "Name a colour."


@pytest.mark.parametrize("record, message", [
    ({**SHAREGPT, "conversations": SHAREGPT["conversations"][:3]}, "record 0 prompt ends with a assistant turn"),
    ({k: v for k, v in FLAT.items() if k != "rejected"}, "record 0 lacks field 'rejected'"),
    ({**FLAT, "chosen": 7}, "record 0 field 'chosen' is a int"),
    ({**FLAT, "rejected": "Paris.", "chosen": "Paris."}, "record 0 has the same text for 'chosen' and 'rejected'"),
    ({**SHAREGPT, "chosen": {"from": "human", "value": "x"}}, "record 0 field 'chosen.from' is 'human', expected 'gpt'"),
])
def test_a_bad_record_is_one_line_naming_the_file_record_and_field(record, message):
    with pytest.raises(DataError, match=f"^pairs.json: {message}"):
        to_pairs([record], "pairs.json")
    good = SHAREGPT if "conversations" in record else FLAT
    pairs, skipped = to_pairs([record, good], "pairs.json", skip_invalid=True)
    assert (len(pairs), skipped) == (1, 1)


def test_chosen_and_rejected_share_the_prompt_tokens_and_end_in_eos():
    tokenizer = embedded_tokenizer()
    template = get_template("auto", tokenizer)
    (pair,), _ = to_pairs([SHAREGPT], "a.json")
    example = encode_pair(pair, tokenizer, template, max_seq_length=512)
    assert tokenizer.decode(example.prompt_ids).endswith("Capital of France?\nassistant\n")
    assert tokenizer.decode(example.chosen_ids) == "Paris." and example.chosen_ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(example.rejected_ids) == "Lyon." and example.rejected_ids[-1] == tokenizer.eos_id
    full = tokenizer.apply_chat_template([*HISTORY, {"role": "assistant", "content": "Paris."}])
    assert full[:len(example.prompt_ids) + len(example.chosen_ids)] == example.prompt_ids + example.chosen_ids
    batch = collate_pairs([example, example], pad_id=tokenizer.pad_id)
    assert batch["input_ids"].shape[0] == 4 and "reference_log_probs" not in batch
    assert (batch["labels"][0] != -100).sum() == len(example.chosen_ids)


def test_truncation_cuts_the_oldest_prompt_tokens_and_keeps_bos_and_eos():
    from llm_lightning.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(shared_file("llama2_tokenizer.model"))  # writes a BOS
    template = get_template("alpaca", tokenizer)
    long_prompt = " ".join(f"word{i}" for i in range(200))
    (pair,), _ = to_pairs([{"prompt": long_prompt, "chosen": "yes " * 100, "rejected": "no"}], "a.json")
    example = encode_pair(pair, tokenizer, template, max_seq_length=128)
    assert example.prompt_truncated and example.answers_truncated
    assert len(example) == 128 and len(example.prompt_ids) == 64  # the prompt keeps half
    whole = encode_pair(pair, tokenizer, template, max_seq_length=4096)
    assert example.prompt_ids == whole.prompt_ids[:1] + whole.prompt_ids[-63:] and whole.prompt_ids[0] == tokenizer.bos_id
    assert example.chosen_ids[-1] == tokenizer.eos_id and tokenizer.decode(example.rejected_ids) == "no"


@pytest.mark.parametrize("max_seq_length", [256, 512])
def test_the_audit_of_the_shared_pairs_counts_cut_prompts_and_marks_both_answers(max_seq_length):
    """All 240 pairs pass the pre-flight checks however their prompts are cut (a cut at a turn
    boundary must not leave ChatML's opening token doubled, as if it were a BOS)."""
    rows = __import__("json").loads(shared_file("dpo_en_demo_240.json").read_text())
    tokenizer = embedded_tokenizer()
    pairs, _ = to_pairs(rows, "dpo.json")
    assert sum(len(p.prompt.messages) > 1 for p in pairs) == 150  # earlier turns and system turns
    template = get_template("auto", tokenizer)
    examples = [encode_pair(p, tokenizer, template, max_seq_length=max_seq_length) for p in pairs]
    report = audit_pairs(examples, tokenizer, source="dpo.json", records_read=240, records_skipped=0, too_long=0,
                         train=200, val=40)
    assert not report.problems and report.kept == 240
    assert 0 < report.prompts_truncated < 240 and report.length_percentiles["max"] <= max_seq_length
    assert "prompts cut from the left" in report.format() and "(rejected instead:) ▶" in report.format()
