"""Chat data: messages/ShareGPT records, one error line per bad record, and loss on every assistant turn."""

from __future__ import annotations

import json

import pytest

from llm_lightning import load_tokenizer
from llm_lightning.data import IGNORE_INDEX, AlpacaDataModule, DataError, encode_conversation, read_records
from llm_lightning.data.audit import marked_spans, supervised_runs
from llm_lightning.prompts import bind, get_template
from tests.conftest import shared_file

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And an even one?"},
            {"role": "assistant", "content": "Two."}]
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a prime."},
                              {"from": "gpt", "value": "Seven."}, {"from": "human", "value": "And an even one?"},
                              {"from": "gpt", "value": "Two."}]}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def test_messages_jsonl_and_sharegpt_read_as_the_same_conversation(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": MESSAGES}) + "\n")
    (tmp_path / "s.json").write_text(json.dumps([SHAREGPT]))
    (messages,), _ = read_records(tmp_path / "m.jsonl")
    (sharegpt,), _ = read_records(tmp_path / "s.json", format="sharegpt")
    assert list(messages.messages) == list(sharegpt.messages) == MESSAGES
    assert (messages.format, sharegpt.format) == ("messages", "sharegpt")
    assert messages.prompt == MESSAGES[:4] and messages.reference == "Two."


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, r"record 1 field 'messages\[0\].role' is 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"record 1 field 'messages\[0\].content' is a int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "record 1 has no assistant turn to learn from"),
    ({"messages": MESSAGES, "tools": "[{"}, "record 1 field 'tools' is not valid JSON"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "record 1 field 'messages' must be a non-empty list"),
])
def test_bad_chat_records_name_file_index_and_field(tmp_path, row, message):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": MESSAGES}, row]))
    with pytest.raises(DataError, match=f"chat.json: {message}"):
        read_records(path)
    assert len(read_records(path, skip_invalid=True)[0]) == 1


def test_unknown_record_shape_names_the_keys(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="odd.json: record 0 has question, answer; expected 'instruction'"):
        read_records(path)


def test_every_assistant_turn_through_its_end_of_turn_token_is_supervised(tokenizer):
    (conversation,), _ = read_records_from(MESSAGES)
    example = encode_conversation(conversation, tokenizer, get_template("auto", tokenizer), max_seq_length=512)
    runs = supervised_runs(example)
    assert [tokenizer.decode(run) for run in runs] == ["Seven.", "Two."]
    assert all(run[-1] == tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") for run in runs)
    assert sum(map(len, runs)) == example.supervised_tokens + (example.labels[0] != IGNORE_INDEX)
    assert marked_spans(example, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n▶Seven.<|im_end|>◀\n<|im_start|>user\nAnd an even one?<|im_end|>\n"
        "<|im_start|>assistant\n▶Two.<|im_end|>◀\n")
    everything = encode_conversation(conversation, tokenizer, get_template("auto", tokenizer), max_seq_length=512,
                                     train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_llama2_turns_on_meta_tokenizer():
    tokenizer = load_tokenizer(shared_file("llama2_tokenizer.model"))
    (conversation,), _ = read_records_from(MESSAGES)
    example = encode_conversation(conversation, tokenizer, get_template("llama2", tokenizer), max_seq_length=512)
    assert example.input_ids[0] == 1 and example.input_ids.count(1) == 2  # a BOS per exchange, none doubled
    runs = supervised_runs(example)
    # Meta's format is " answer </s>": the answer, its trailing space and EOS are learned
    assert [tokenizer.decode(run) for run in runs] == ["Seven. ", "Two. "] and all(r[-1] == 2 for r in runs)


def test_a_template_that_does_not_render_turn_by_turn_is_refused(tokenizer):
    odd = bind("odd", "{% for m in messages %}{% if loop.last %}LAST{% endif %}{{ m['content'] }}{% endfor %}",
               tokenizer)
    (conversation,), _ = read_records_from(MESSAGES)
    with pytest.raises(DataError, match="template odd does not render conversations turn by turn"):
        encode_conversation(conversation, tokenizer, odd, max_seq_length=512)


def read_records_from(messages, tmp=None):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "one.json"
    path.write_text(json.dumps([{"messages": messages}]))
    return read_records(path)


def test_glaive_tool_calls_with_the_embedded_template(tokenizer):
    module = AlpacaDataModule(str(shared_file("glaive_toolcall_en_demo.json")), tokenizer=tokenizer,
                              max_seq_length=2048, val_size=0.1)
    module.setup()
    assert module.template_name == "auto" and module.report.records_read == 300
    # one conversation (11,632 tokens) asks its first question after token 2048
    assert module.report.kept == 299 and module.report.too_long == 1
    example = next(e for e, r in zip(module.val_examples, module.val_records)
                   if any(m["role"] == "tool" for m in r.messages))
    text = marked_spans(example, tokenizer)
    assert "You can call the following functions" in text and '"name"' in text
    assert "<|im_start|>tool\n" in text and "<|im_start|>tool\n▶" not in text  # observations are not learned
    assert text.count("▶") == sum(1 for m in module.val_records[module.val_examples.index(example)].messages
                                  if m["role"] == "assistant")


@pytest.mark.parametrize("source, problem", [
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
     r"supervised turns do not end in EOS '</s>' \(one ends"),
    ("{{ bos_token + bos_token }}{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
     "{{ eos_token }}{% endif %}{% endfor %}", "examples start with two BOS tokens"),
])
def test_preflight_refuses_a_template_that_would_ruin_the_run(tiny_tokenizer_dir, source, problem):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.chat_template = source
    module = AlpacaDataModule(tokenizer=tokenizer, template="auto", limit=20, val_size=2)
    with pytest.raises(DataError, match=f"with template auto: .*{problem}"):
        module.setup()


def test_prompts_file_of_conversations_continues_after_the_last_user_turn(tmp_path):
    from llm_lightning.prompt_files import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"messages": MESSAGES[:2]}) + "\n")
    first, second = read_prompts(path)
    assert list(first.messages) == MESSAGES[:4]  # the file's last answer is left out
    assert list(second.messages) == MESSAGES[:2] and second.title == "Name a prime."
