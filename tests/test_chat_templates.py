"""Chat templates: our ids equal transformers' ``apply_chat_template`` ids, and the built-ins' exact text."""

from __future__ import annotations

import json

import pytest

from llm_lightning import load_tokenizer
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.prompts import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError, get_template, user_message
from tests.conftest import shared_file

SYSTEM = {"role": "system", "content": "You answer in one sentence."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [SYSTEM, {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
     {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": " Two, the only one. "},
     {"role": "user", "content": "Thanks\nbye"}],
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    embedded_tokenizer().save_hf(directory)
    return directory


@pytest.fixture(scope="module")
def llama2_chat_dir(tmp_path_factory):
    """Meta's LLaMA-2 tokenizer with a LLaMA-2-chat ``tokenizer_config.json`` (legacy SentencePiece
    spacing: text after a special token gets the word-start mark, as Meta's own encoder gives it)."""
    directory = tmp_path_factory.mktemp("llama2_chat")
    (directory / "tokenizer.model").write_bytes(shared_file("llama2_tokenizer.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": BUILTIN_TEMPLATES["llama2"],
    }))
    return directory


@pytest.fixture(scope="module")
def llama3_instruct_dir(tmp_path_factory):
    """A byte-level BPE vocabulary with LLaMA-3's header and end-of-turn special tokens, and the
    LLaMA-3-instruct template."""
    from tokenizers import AddedToken

    directory = tmp_path_factory.mktemp("llama3_instruct")
    raw = embedded_tokenizer().tok
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_str(raw.to_str())
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "add_bos_token": True, "chat_template": BUILTIN_TEMPLATES["llama3"],
    }))
    return directory


@pytest.mark.parametrize("which", ["smollm2_dir", "llama2_chat_dir", "llama3_instruct_dir"])
def test_ids_equal_transformers_apply_chat_template(which, request):
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(which)
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                  return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == list(expected), (
                which, messages, generation_prompt)


def test_embedded_template_is_smollm2s_chatml_with_its_system_prompt():
    tokenizer = embedded_tokenizer()
    assert get_template("auto", tokenizer).format("Hi") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids.count(tokenizer.eos_id) == 2


def test_builtin_llama2_and_alpaca_text():
    tokenizer = load_tokenizer(shared_file("llama2_tokenizer.model"))
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert get_template("llama2", tokenizer).render(messages) == (
        "<s>[INST] <<SYS>>\nYou answer in one sentence.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]")
    alpaca = get_template("alpaca", tokenizer)
    assert alpaca.render([user_message("Add.", "2 and 3"), {"role": "assistant", "content": "5"}]).startswith(
        "<s>Below is an instruction that describes a task, paired with an input")
    ids = tokenizer.encode(alpaca.format("Add."), bos=True)
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, not a second one


def test_template_errors_are_one_line():
    tokenizer = load_tokenizer(shared_file("llama2_tokenizer.model"))
    with pytest.raises(ChatTemplateError, match="no chat template for template=auto"):
        get_template("auto", tokenizer)
    with pytest.raises(ChatTemplateError, match=r"template=chatml needs the special tokens <\|im_start\|>"):
        get_template("chatml", tokenizer)
    with pytest.raises(ChatTemplateError, match="no place for a tool message"):
        get_template("alpaca", tokenizer).render([{"role": "tool", "content": "{}"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tokenizer.apply_chat_template([], chat_template="{% for %}")


def test_a_prefilled_answer_is_left_open_for_the_model_to_continue():
    """``continuation`` (lm-eval's ``gen_prefix``, transformers' ``continue_final_message``): the
    text stops inside the last message, its trailing space kept unless the template trims it, with
    no end of turn after it, even when the answer's characters also occur in the end of turn."""
    tokenizer = embedded_tokenizer()
    alpaca = get_template("alpaca", tokenizer)
    request = user_message("Name a fruit.")
    assert alpaca.continuation([request, {"role": "assistant", "content": "The fruit is "}]) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\nThe fruit is ")
    chatml = get_template("chatml", tokenizer)
    assert chatml.continuation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "im"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nim")
    assert chatml.continuation([{"role": "assistant", "content": "  "}]) == "<|im_start|>assistant\n  "
    trimming = ChatTemplate("trim", "{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}", "", "")
    assert trimming.continuation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b \n"}]) == "[a][b"
    dropping = ChatTemplate("drop", "{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}", "", "")
    with pytest.raises(ChatTemplateError, match="cannot stop inside that message"):
        dropping.continuation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}])
