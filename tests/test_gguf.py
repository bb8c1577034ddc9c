"""GGUF: the embedded SmolLM2 against transformers, SentencePiece vocabularies, quantized tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_lightning import load_pretrained, load_tokenizer
from llm_lightning.checkpoints.gguf_format import read_gguf_tokenizer
from tests.conftest import shared_file

TEXTS = [
    "What is the capital of France?",
    "Numbers 12345 and 3.14, code `x = y**2`;  double  spaces\nnew line",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Unicode: naïve café, 日本語, emoji 🚀",
]


@pytest.fixture(scope="module")
def transformers_smollm2(default_gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(default_gguf_path.parent), default_gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


def test_smollm2_config_from_metadata(default_model):
    model, tokenizer = default_model
    config = model.config
    assert (config.dim, config.n_layers, config.n_heads, config.kv_heads, config.ffn_hidden_dim) == (576, 30, 9, 3, 1536)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>" in tokenizer.chat_template


def test_smollm2_logits_match_transformers(default_model, transformers_smollm2):
    model, tokenizer = default_model
    reference, _ = transformers_smollm2
    ids = torch.tensor([tokenizer.encode(TEXTS[2] + "Tell me about the Eiffel Tower in Paris.")])
    with torch.no_grad():
        difference = (model(ids) - reference(ids).logits).abs().max().item()
    assert difference <= 2e-4  # measured 8e-5: both sides dequantize with the gguf package


def test_smollm2_tokenizer_matches_transformers(default_model, transformers_smollm2):
    _, tokenizer = default_model
    _, reference = transformers_smollm2
    for text in TEXTS:
        assert tokenizer.encode(text, bos=False) == reference(text, add_special_tokens=False).input_ids


def test_default_model_answers_capital_of_france(default_model):
    from llm_lightning.generation import generate, stream
    from llm_lightning.prompts import get_template

    model, tokenizer = default_model
    prompt = get_template("auto", tokenizer).format("What is the capital of France?")
    answer = generate(model, tokenizer, prompt, max_new_tokens=24)
    assert "Paris" in answer
    assert "".join(stream(model, tokenizer, prompt, max_new_tokens=24)) == answer


def _sentencepiece_vocab(path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


def write_tiny_gguf(path, *, vocab: int, tokens=None, scores=None, types=None, quantize_wq=None, raw_wq=None):
    """A tiny LLaMA GGUF written with the gguf package (F32 weights, optionally one quantized)."""
    import gguf

    from llm_lightning.checkpoints.gguf_format import _LAYER_NAMES, _TOP_NAMES

    torch.manual_seed(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(160)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens or [f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores(scores or [0.0] * vocab)
    writer.add_token_types(types or [1] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    shapes = {"token_embd": (vocab, 64), "output_norm": (64,), "output": (vocab, 64)}
    layer = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
             "ffn_gate": (160, 64), "ffn_up": (160, 64), "ffn_down": (64, 160), "attn_norm": (64,), "ffn_norm": (64,)}
    shapes.update({f"blk.0.{k}": v for k, v in layer.items()})
    assert set(shapes) == {*_TOP_NAMES, *(f"blk.0.{k}" for k in _LAYER_NAMES)}
    arrays = {}
    for name, shape in shapes.items():
        array = (np.random.default_rng(len(name)).standard_normal(shape) * 0.05).astype(np.float32)
        arrays[name] = array
        if name == "blk.0.attn_q" and raw_wq is not None:
            writer.add_tensor(f"{name}.weight", raw_wq[0], raw_shape=raw_wq[0].shape, raw_dtype=raw_wq[1])
        elif name == "blk.0.attn_q" and quantize_wq is not None:
            writer.add_tensor(f"{name}.weight", gguf.quants.quantize(array, quantize_wq), raw_dtype=quantize_wq)
        else:
            writer.add_tensor(f"{name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def test_sentencepiece_kind_gguf_and_quantized_tensor(tmp_path):
    import gguf

    sp_path = shared_file("llama2_tokenizer.model")
    tokens, scores, types = _sentencepiece_vocab(sp_path)
    path = tmp_path / "tiny-llama2-vocab.gguf"
    arrays = write_tiny_gguf(path, vocab=len(tokens), tokens=tokens, scores=scores, types=types,
                             quantize_wq=gguf.GGMLQuantizationType.Q8_0)
    model, tokenizer = load_pretrained(path)
    original = load_tokenizer(sp_path)
    for text in TEXTS:
        assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.encode("Hello world") == [1, 15043, 3186]
    assert torch.equal(model.tok_embeddings.weight, torch.from_numpy(arrays["token_embd"]))
    wq_error = (model.layers[0].attention.wq.weight - torch.from_numpy(arrays["blk.0.attn_q"])).abs().max()
    assert 0 < wq_error < 2e-3  # Q8_0 round trip: quantized, then dequantized on load
    assert read_gguf_tokenizer(path).encode("Hello world") == [1, 15043, 3186]


def test_bpe_gguf_declares_its_end_of_turn_token_as_a_stop_id():
    """Llama-3 GGUFs carry <|eot_id|> as ``tokenizer.ggml.eot_token_id`` beside EOS <|end_of_text|>."""
    from llm_lightning.checkpoints.gguf_tokenizer import tokenizer_from_gguf_metadata

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": ["a", "b", "<|end_of_text|>", "<|eot_id|>"], "tokenizer.ggml.token_type": [1, 1, 3, 3],
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 3}
    tokenizer = tokenizer_from_gguf_metadata(meta, "tiny.gguf")
    assert tokenizer.eos_id == 2 and tokenizer.stop_ids == {2, 3}
    assert tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.eot_token_id": 2}, "tiny.gguf").stop_ids == {2}
