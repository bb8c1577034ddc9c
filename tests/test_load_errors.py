"""Bad checkpoints give one clear line naming the file and what was expected; pickles never run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llm_lightning import CheckpointError, LLaMA, LLaMAConfig, TokenizerError, load_pretrained
from llm_lightning.checkpoints import save_meta_checkpoint
from tests.conftest import make_hf_llama, save_hf_dir


class _Payload:
    """Pickles to a call that writes a marker file: proof of code execution if it ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_malicious_pickle_is_refused_without_running(tmp_path, tiny_tokenizer_dir):
    directory = tmp_path / "evil"
    save_meta_checkpoint(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=384)), directory)
    marker = tmp_path / "marker"
    state = torch.load(directory / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = _Payload(marker)
    torch.save(state, directory / "consolidated.00.pth")

    with pytest.raises(CheckpointError) as error:
        load_pretrained(directory, tokenizer=tiny_tokenizer_dir)
    assert "consolidated.00.pth" in _one_line(error.value) and "refused" in str(error.value)
    assert not marker.exists()
    torch.load(directory / "consolidated.00.pth", weights_only=False)  # the payload is real:
    assert marker.read_text() == "pwned"


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory; expected a Meta"):
        load_pretrained(tmp_path / "nowhere")


def test_directory_that_is_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        load_pretrained(tmp_path)


def test_shapes_that_disagree_with_the_config(tmp_path, tiny_tokenizer_dir):
    directory = save_hf_dir(make_hf_llama(), tmp_path / "hf", tiny_tokenizer_dir)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(directory)
    message = _one_line(error.value)
    assert "feed_forward.w" in message and "has shape" in message
    assert "expects [64, 128]" in message or "expects [128, 64]" in message


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, tiny_tokenizer_dir):
    directory = tmp_path / "small-vocab"
    save_meta_checkpoint(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=100)), directory)
    with pytest.raises(TokenizerError) as error:
        load_pretrained(directory, tokenizer=tiny_tokenizer_dir)
    assert "embeds only 100" in _one_line(error.value) and "tokenizer.json" in str(error.value)


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors(tmp_path, tiny_tokenizer_dir):
    directory = save_hf_dir(make_hf_llama(), tmp_path / "hf", tiny_tokenizer_dir)
    _truncate(directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(directory)
    assert "model.safetensors" in _one_line(error.value) and "truncated or corrupt" in str(error.value)


def test_truncated_pytorch_bin(tmp_path, tiny_tokenizer_dir):
    directory = save_hf_dir(make_hf_llama(), tmp_path / "hf", tiny_tokenizer_dir, bin_format=True)
    _truncate(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(directory)
    assert "pytorch_model.bin" in _one_line(error.value) and "truncated or corrupt" in str(error.value)


def test_truncated_gguf(tmp_path, default_gguf_path):
    path = tmp_path / "cut.gguf"
    shutil.copy(default_gguf_path, path)
    _truncate(path, keep=0.3)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    assert "cut.gguf" in _one_line(error.value)


def test_gguf_tensor_type_that_cannot_be_dequantized(tmp_path):
    import gguf
    import numpy as np

    from tests.test_gguf import write_tiny_gguf

    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    raw = np.zeros((64, 2 * block_bytes), dtype=np.uint8)  # 64 rows of 64 values in Q8_1 blocks
    path = tmp_path / "q8_1.gguf"
    write_tiny_gguf(path, vocab=64, raw_wq=(raw, gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    assert "blk.0.attn_q.weight" in _one_line(error.value) and "Q8_1" in str(error.value)


def test_invalid_params_json(tmp_path):
    (tmp_path / "params.json").write_text('{"dim": 64,')
    with pytest.raises(CheckpointError, match=r"params.json: invalid JSON at line 1"):
        load_pretrained(tmp_path)


def test_missing_tokenizer(tmp_path):
    directory = tmp_path / "a" / "b"
    save_meta_checkpoint(LLaMA(LLaMAConfig.from_name("tiny")), directory)
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_pretrained(directory)
