"""Evaluation: perplexity is exp(mean token NLL) over responses; the CLI compares base and tuned,
and ranks preference pairs for a DPO run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm_lightning import LLaMA, LLaMAConfig, load_pretrained
from llm_lightning.adapter import load_adapter
from llm_lightning.data import IGNORE_INDEX, PreferenceDataModule, encode_conversation
from llm_lightning.data.conversations import from_alpaca
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import lora_disabled
from llm_lightning.metrics import perplexity, rouge_l
from llm_lightning.prompts import get_template
from tests.conftest import make_hf_llama, save_hf_dir, write_preference_pairs
from tests.test_dpo import direct_log_probs
from tests.train_runner import run_tool, run_train


def test_perplexity_equals_exp_of_mean_token_nll_by_hand():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=49152)).eval()
    tokenizer = embedded_tokenizer()
    records = [from_alpaca({"instruction": i, "input": x, "output": o}) for i, x, o in (
        ("Say hi.", "", "Hi!"), ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
        ("Name a color.", "", "Blue is a color of the sky."))]
    template = get_template("alpaca", tokenizer)
    examples = [encode_conversation(r, tokenizer, template, max_seq_length=128) for r in records]
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logprobs = model(torch.tensor([example.input_ids]))[0].log_softmax(-1)
            for position in range(1, len(example.input_ids)):
                if example.labels[position] != IGNORE_INDEX:
                    total_nll -= logprobs[position - 1, example.labels[position]].item()
                    total_tokens += 1
    assert total_tokens == sum(e.supervised_tokens for e in examples)
    expected = math.exp(total_nll / total_tokens)
    assert perplexity(model, examples, pad_id=tokenizer.pad_id, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_rouge_l_of_identical_and_disjoint_text():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark loudly"], ["the cat sat"]) == 0.0


def test_evaluate_cli_compares_base_and_fine_tuned(tmp_path, tiny_tokenizer_dir):
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), tmp_path / "base", tiny_tokenizer_dir)
    run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "trainer.max_epochs=1",
              "trainer.limit_train_batches=4", "data.max_seq_length=128", "data.val_size=6", "lora.r=4",
              "optimizer.lr=3e-2", "scheduler.warmup_steps=0", run_dir=tmp_path / "run")
    output = tmp_path / "eval.json"
    printed = run_tool("evaluate", f"ckpt_path={tmp_path / 'run'}", f"model.source={base}", "max_new_tokens=6",
                       f"output={output}")
    results = json.loads(output.read_text())
    assert 0 < results["examples"] <= 6 and f"{results['examples']} examples from" in printed.stdout
    assert results["base"]["perplexity"] != results["perplexity"]
    for scores in (results, results["base"]):
        assert 0.0 <= scores["rouge_l"] <= 1.0 and 0.0 <= scores["bleu"] <= 100.0
    assert "| model | perplexity | ROUGE-L | BLEU |" in printed.stdout
    assert printed.stdout.strip().splitlines()[-1] == f"results: {output}"
    run_tool("evaluate", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"model.source={base}",
             "split=all", "max_examples=3", "max_new_tokens=4", f"output={output}")
    whole = json.loads(output.read_text())
    assert whole["examples"] == 3 and whole["split"] == "all"


def test_evaluate_ranks_held_out_pairs_by_the_dpo_implicit_reward(tmp_path, tiny_tokenizer_dir):
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), tmp_path / "base", tiny_tokenizer_dir)
    pairs = write_preference_pairs(tmp_path / "pairs.json", count=12)
    run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "stage=dpo", "data=preferences",
              f"data.path={pairs}", "data.val_size=4", "data.max_seq_length=128", "data.batch_size=2", "dpo.beta=0.5",
              "trainer.max_epochs=1", "lora.r=4", "optimizer.lr=3e-2", "scheduler.warmup_steps=0",
              run_dir=tmp_path / "run")
    output = tmp_path / "eval.json"
    printed = run_tool("evaluate", f"ckpt_path={tmp_path / 'run'}", f"model.source={base}", f"output={output}")
    assert printed.stdout.strip().splitlines()[-1] == f"results: {output}"
    results = json.loads(output.read_text())
    assert results["pairs"] == 4 and results["stage"] == "dpo"
    assert results["base"]["reward_accuracy"] == 0.5 and results["base"]["reward_margin"] == 0.0

    # The implicit reward, computed directly: beta * (policy - base) log-probabilities of each answer.
    model, tokenizer = load_pretrained(base)
    checkpoint = load_adapter(model, tokenizer, tmp_path / "run" / "checkpoints" / "last.ckpt")
    data = PreferenceDataModule(tokenizer=tokenizer, **checkpoint["PreferenceDataModule"]["settings"])
    data.setup()
    batch = data._collate()(data.val_examples)
    with torch.no_grad():
        policy, _ = direct_log_probs(model.eval(), batch)
        with lora_disabled(model):
            reference, _ = direct_log_probs(model, batch)
    rewards = 0.5 * (policy - reference)
    chosen, rejected = rewards[:4], rewards[4:]
    assert (chosen != rejected).all()
    assert results["reward_accuracy"] == (chosen > rejected).float().mean().item()
    assert results["reward_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-4)

    run_tool("evaluate", f"ckpt_path={tmp_path / 'run'}", f"model.source={base}", "split=all", "max_examples=3",
             f"output={output}")
    assert json.loads(output.read_text())["pairs"] == 3
