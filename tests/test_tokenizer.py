"""Tokenizers: LLaMA-2 SentencePiece facts, streaming decode, special tokens, pad vs eos."""

from __future__ import annotations

import pytest

from llm_lightning import load_tokenizer
from tests.conftest import shared_file

MIXED_TEXT = (
    "Hello world!  Two spaces, a tab\tand\nnew lines\n\n  indented.\n"
    "Unicode: naïve café, 日本語のテキスト, Ελληνικά, emoji 🚀🎉👩‍👩‍👧 and ✓.\n"
    "Numbers 3.14159 and 1,000,000; code: def f(x): return x**2  # done"
)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    return load_tokenizer(shared_file("llama2_tokenizer.model"))


def test_llama2_known_ids(llama2_tokenizer):
    assert llama2_tokenizer.encode("Hello world") == [1, 15043, 3186]
    assert llama2_tokenizer.encode(" Hello world") == [1, 29871, 15043, 3186]
    assert llama2_tokenizer.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert (llama2_tokenizer.bos_id, llama2_tokenizer.eos_id, llama2_tokenizer.vocab_size) == (1, 2, 32000)
    assert llama2_tokenizer.pad_id != llama2_tokenizer.eos_id


def _stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


def test_llama2_streaming_decode_equals_full_decode(llama2_tokenizer):
    ids = llama2_tokenizer.encode(MIXED_TEXT)
    pieces = _stream(llama2_tokenizer, ids)
    assert "".join(pieces) == llama2_tokenizer.decode(ids) == MIXED_TEXT
    assert sum(1 for p in pieces if p) > len(ids) // 3  # it really streams


def test_smollm2_tokenizer_streaming_and_specials(default_model):
    _, tokenizer = default_model
    ids = tokenizer.encode(MIXED_TEXT, bos=False)
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == MIXED_TEXT
    assert tokenizer.encode("<|im_start|>user", bos=False) == [1, 4093]
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.pad_id != tokenizer.eos_id
    assert tokenizer.encode("Hi", bos=True) == tokenizer.encode("Hi", bos=False)  # SmolLM2 uses no BOS


def test_hf_tokenizer_json_from_directory(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    ids = tokenizer.encode("The quick brown fox", eos=True)
    assert ids[0] == tokenizer.bos_id == tokenizer.token_to_id("<s>")
    assert ids[-1] == tokenizer.eos_id == tokenizer.token_to_id("</s>")
    assert tokenizer.decode(ids) == "The quick brown fox"
    assert tokenizer.pad_id == tokenizer.token_to_id("<pad>")


def test_end_of_turn_ids_declared_beside_eos_stop_generation(tiny_tokenizer_dir, tmp_path):
    """Llama-3 Instruct's files list <|eot_id|> beside <|end_of_text|> as ``eos_token_id``."""
    import json
    import shutil

    directory = tmp_path / "tokenizer"
    shutil.copytree(tiny_tokenizer_dir, directory)
    assert load_tokenizer(directory).stop_ids == {2}
    (directory / "config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eos_id == 2 == tokenizer.token_to_id("</s>")
    assert tokenizer.stop_ids == {2, 7, 9} and tokenizer.end_of_turn_ids == (7, 9)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, tokenizer.vocab_size, -1]}))
    assert load_tokenizer(directory).stop_ids == {2, 7, 9}  # ids that name no token are dropped
