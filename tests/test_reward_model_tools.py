"""A reward model out of ``train.py stage=rm``: ``python -m llm_lightning.score`` scores answers and
pairs, ``evaluate.py`` ranks the held-out pairs, and the Hugging Face export gives the same scores
in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning import load_pretrained
from llm_lightning.adapter import load_reward_model, trained_template
from llm_lightning.data import PreferenceDataModule
from llm_lightning.data.batching import collate
from llm_lightning.data.pair_encoding import encode_pair
from llm_lightning.data.records import read_rows
from llm_lightning.reward_model import score_sequences
from llm_lightning.tools.score import read_scoring_input
from tests.conftest import make_hf_llama, save_hf_dir, write_preference_pairs
from tests.train_runner import run_tool, run_train, summary


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny HF base saved by transformers, a reward model trained on it, and its pairs file."""
    root = tmp_path_factory.mktemp("rm")
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), root / "base", tiny_tokenizer_dir)
    pairs = write_preference_pairs(root / "pairs.json", count=12)
    run = run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "stage=rm", "data=preferences",
              f"data.path={pairs}", "data.val_size=4", "data.max_seq_length=128", "data.batch_size=2",
              "trainer.max_epochs=1", "lora.r=4", "optimizer.lr=3e-2", "scheduler.warmup_steps=0",
              run_dir=root / "run")
    assert "  -> " not in run.stdout  # no sample answers from a reward model at validation
    # LoRA r=4 on wq (64 -> 64) and wv (64 -> 32) in 2 layers, and the head's 64 weights
    assert summary(root / "run")["trainable_parameters"] == 2 * 4 * ((64 + 64) + (64 + 32)) + 64
    return base, root / "run" / "checkpoints" / "last.ckpt", pairs


def our_sequences(base, checkpoint, path):
    """The token ids of every answer in ``path``, as the score tool renders and truncates them."""
    model, tokenizer = load_pretrained(base)
    head, contents = load_reward_model(model, tokenizer, checkpoint)
    template = trained_template(contents, tokenizer)
    items, paired = read_scoring_input(*read_rows(path))
    encoded = [encode_pair(item, tokenizer, template, max_seq_length=128) for item in items]
    return [e.chosen for e in encoded] + ([e.rejected for e in encoded] if paired else []), tokenizer.pad_id


def test_score_cli_scores_pairs_and_single_answers(reward_model, tmp_path):
    base, checkpoint, pairs = reward_model
    # Long enough for every answer whole: a pair truncates both answers to fit the longer one.
    result = run_tool("llm_lightning.score", f"ckpt_path={checkpoint}", f"model.source={base}", f"input={pairs}",
                      f"output={tmp_path / 'pairs.jsonl'}", "max_seq_length=1024")
    assert result.stdout.strip().splitlines()[-1] == f"results: {tmp_path / 'pairs.jsonl'}"
    scored = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scored] == list(range(12)) and {"chosen", "rejected"} <= scored[0].keys()
    wins = sum(s["chosen"] > s["rejected"] for s in scored)
    assert f"chosen scored higher in {wins} ({wins / 12:.3f})" in result.stdout

    # The chosen answers alone score exactly as inside their pairs: as conversations (Alpaca records,
    # rendered as the pairs were), and as {prompt, response} records where the prompt is the same text.
    records = json.loads(pairs.read_text())
    chosen = [s["chosen"] for s in scored]
    answers = {"conversations": [{"instruction": r["instruction"], "input": r["input"], "output": r["chosen"]}
                                 for r in records],
               "prompt_response": [{"prompt": r["instruction"], "response": r["chosen"]} for r in records]}
    for kind, rows in answers.items():
        (tmp_path / kind).write_text("".join(json.dumps(row) + "\n" for row in rows))
        run_tool("llm_lightning.score", f"ckpt_path={checkpoint}", f"model.source={base}", f"input={tmp_path / kind}",
                 f"output={tmp_path / kind}.out", "batch_size=5", "max_seq_length=1024")
        singles = [json.loads(line)["score"] for line in (tmp_path / f"{kind}.out").read_text().splitlines()]
        same_prompt = [not r["input"] or kind == "conversations" for r in records]
        assert sum(same_prompt) >= 4
        assert [x for x, same in zip(singles, same_prompt) if same] == pytest.approx(
            [x for x, same in zip(chosen, same_prompt) if same], abs=1e-5)
    assert len(set(singles)) > 1  # the trained head tells answers apart


def test_hf_export_is_a_sequence_classifier_with_our_scores(reward_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base, checkpoint, pairs = reward_model
    run_tool("llm_lightning.score", f"ckpt_path={checkpoint}", f"model.source={base}", f"input={pairs}",
             f"output={tmp_path / 'scores.jsonl'}")
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    ours = [s["chosen"] for s in scored] + [s["rejected"] for s in scored]

    run_tool("export", f"ckpt_path={checkpoint}", f"model.source={base}", "format=hf", f"output_dir={tmp_path / 'hf'}")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    sequences, pad_id = our_sequences(base, checkpoint, pairs)
    assert config["pad_token_id"] == pad_id
    batch = collate(sequences, pad_id=pad_id)  # one right-padded batch: transformers finds each last token
    assert (batch["input_ids"] == pad_id).any()
    with torch.no_grad():
        theirs = classifier(batch["input_ids"]).logits[:, 0]
    assert theirs.tolist() == pytest.approx(ours, abs=1e-4)


def test_a_reward_model_is_refused_where_an_answer_is_expected(reward_model, tmp_path):
    base, checkpoint, _ = reward_model
    result = run_tool("generate", f"ckpt_path={checkpoint}", f"model.source={base}", check=False)
    assert result.returncode == 2
    assert "a reward model (stage=rm) scores answers" in result.stderr
    result = run_tool("export", f"ckpt_path={checkpoint}", f"model.source={base}", "format=peft",
                      f"output_dir={tmp_path}", check=False)
    assert result.returncode == 2 and "exports as format=hf" in result.stderr


def test_evaluate_ranks_the_held_out_pairs_base_against_tuned(reward_model, tmp_path):
    base, checkpoint, pairs = reward_model
    result = run_tool("evaluate", f"ckpt_path={checkpoint}", f"model.source={base}", f"output={tmp_path / 'eval.json'}")
    assert result.stdout.strip().splitlines()[-1] == f"results: {tmp_path / 'eval.json'}"
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["pairs"] == 4 and results["stage"] == "rm" and results["split"] == "val"
    assert results["base"]["reward_accuracy"] == 0.5 and results["base"]["reward_margin"] == 0.0
    # The same four pairs, scored by the score tool from a file of them: the same ranking.
    model, tokenizer = load_pretrained(base)
    head, contents = load_reward_model(model, tokenizer, checkpoint)
    data = PreferenceDataModule(tokenizer=tokenizer, **contents["PreferenceDataModule"]["settings"])
    data.setup()
    chosen = score_sequences(model.eval(), head, [p.chosen for p in data.val_examples], tokenizer.pad_id, 8)
    rejected = score_sequences(model, head, [p.rejected for p in data.val_examples], tokenizer.pad_id, 8)
    wins = sum(c > r for c, r in zip(chosen, rejected)) + 0.5 * sum(c == r for c, r in zip(chosen, rejected))
    assert results["reward_accuracy"] == results["tuned"]["reward_accuracy"] == wins / 4
    assert results["reward_margin"] == pytest.approx(sum(chosen) / 4 - sum(rejected) / 4, abs=1e-6)
