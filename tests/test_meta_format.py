"""Meta ``params.json`` + ``consolidated.NN.pth``: write, read back, merge model-parallel shards."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, load_pretrained
from llm_lightning.checkpoints import save_meta_checkpoint


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_gives_identical_logits(num_shards, tied, tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=384, tie_embeddings=tied)).eval()
    directory = tmp_path / "tiny-meta"
    save_meta_checkpoint(model, directory, num_shards=num_shards)
    shards = sorted(directory.glob("consolidated.*.pth"))
    assert [p.name for p in shards] == [f"consolidated.{i:02d}.pth" for i in range(num_shards)]
    if num_shards == 2:
        first = torch.load(shards[0], weights_only=True)
        assert first["layers.0.attention.wq.weight"].shape == (32, 64)  # column-parallel: rows split
        assert first["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel: columns split
        assert first["tok_embeddings.weight"].shape == (384, 32)        # LLaMA-2 splits the embedding dim

    loaded, _ = load_pretrained(directory, tokenizer=tiny_tokenizer_dir)
    assert loaded.config.ffn_hidden_dim == 160 and loaded.config.kv_heads == 2
    assert loaded.config.tie_embeddings == tied
    input_ids = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids), model(input_ids))


def test_vocab_parallel_embedding_shards_merge(tmp_path, tiny_tokenizer_dir):
    """LLaMA-3's reference code splits the embedding along the vocabulary instead."""
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=384)).eval()
    save_meta_checkpoint(model, tmp_path, num_shards=2)
    embedding = model.tok_embeddings.weight.detach()
    for rank, half in enumerate(torch.chunk(embedding, 2, dim=0)):
        path = tmp_path / f"consolidated.0{rank}.pth"
        shard = torch.load(path, weights_only=True)
        shard["tok_embeddings.weight"] = half.clone()
        torch.save(shard, path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1  # as Meta's LLaMA-2 files say; the size comes from the weights
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded, _ = load_pretrained(tmp_path, tokenizer=tiny_tokenizer_dir)
    assert torch.equal(loaded.tok_embeddings.weight, embedding)


def test_params_json_for_preset_is_metas(tmp_path):
    from llm_lightning.checkpoints.meta_format import params_for

    params = params_for(LLaMAConfig.from_name("llama3-8b"))
    assert params["multiple_of"] == 1024 and params["ffn_dim_multiplier"] == 1.3
    assert params["n_kv_heads"] == 8 and params["rope_theta"] == 500000.0
