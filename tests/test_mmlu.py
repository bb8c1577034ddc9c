"""MMLU: the exact 5-shot prompt, categories, accuracy as a mean over questions, the builtin scorer
and lm-eval giving the same numbers, and the evaluate CLI putting base and tuned side by side."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llm_lightning import mmlu
from llm_lightning.errors import UserFacingError
from llm_lightning.settings import EvaluateDataOverrides, EvaluateSettings, Harness, Task
from llm_lightning.loglikelihood import continuation_logprobs, encode_pair
from tests.conftest import SHARED_DATA, make_hf_llama, save_hf_dir
from tests.train_runner import run_tool, run_train

# Questions written for these tests, in the original release's CSV layout.
DEV = {
    "anatomy": [["Which bone is in the thigh?", "Femur", "Ulna", "Radius", "Tibia", "A"],
                ["How many chambers has the human heart?", "Two", "Three", "Four", "Five", "C"]],
    "philosophy": [["Who wrote the Republic?", "Aristotle", "Plato", "Kant", "Hume", "B"],
                   ["Which branch studies knowledge?", "Ethics", "Aesthetics", "Logic", "Epistemology", "D"]],
}
VAL = {
    "anatomy": [["  Which organ pumps blood?\n", "Liver", "Heart", "Lung", "Kidney", "B"],
                ["Which organ filters blood?", "Kidney", "Heart", "Skin", "Bone", "A"],
                ["Where is the tibia?", "Arm", "Skull", "Leg", "Chest", "C"]],
    "philosophy": [["Who wrote 'Critique of Pure Reason'?", "Hume", "Locke", "Kant", "None", "C"]],
}


def write_folder(root: Path, split: str = "val") -> Path:
    for name, subjects in (("dev", DEV), (split, VAL)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for subject, rows in subjects.items():
            with (root / name / f"{subject}_{name}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("mmlu"))


def test_prompt_is_the_standard_few_shot_format(folder):
    exemplars = mmlu.read_subject(folder, "anatomy", "dev")
    question = mmlu.read_subject(folder, "anatomy", "val")[0]
    assert mmlu.few_shot_prefix("anatomy", exemplars) + question.text() == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which bone is in the thigh?\nA. Femur\nB. Ulna\nC. Radius\nD. Tibia\nAnswer: A\n\n"
        "How many chambers has the human heart?\nA. Two\nB. Three\nC. Four\nD. Five\nAnswer: C\n\n"
        "Which organ pumps blood?\nA. Liver\nB. Heart\nC. Lung\nD. Kidney\nAnswer:"
    )
    assert mmlu.description("high_school_us_history").endswith("about high school us history.\n\n")


def test_categories_hold_the_57_subjects_as_lm_eval_groups_them():
    sizes = {category: len(subjects) for category, subjects in mmlu.CATEGORY_SUBJECTS.items()}
    assert sizes == {"STEM": 19, "humanities": 13, "social sciences": 12, "other": 13}
    assert len(mmlu.SUBJECTS) == 57 and mmlu.CATEGORY["anatomy"] == "STEM"
    if (SHARED_DATA / "mmlu").is_dir():
        on_disk = {p.name.removesuffix("_val.csv") for p in (SHARED_DATA / "mmlu" / "val").glob("*_val.csv")}
        assert on_disk == set(mmlu.SUBJECTS)


def test_accuracy_is_the_mean_over_questions_not_subjects():
    summary = mmlu.summarize(["anatomy"] * 3 + ["philosophy"], [True, True, True, False])
    assert summary["accuracy"] == 0.75 and summary["questions"] == 4
    assert summary["per_subject"] == {"anatomy": 1.0, "philosophy": 0.0}
    assert summary["per_category"] == {"STEM": 1.0, "humanities": 0.0}


def test_malformed_folders_are_one_line_errors(tmp_path, folder):
    with pytest.raises(UserFacingError, match="no dev/ folder"):
        mmlu.eval_split(tmp_path)
    with pytest.raises(UserFacingError, match="subjects: anatomyy not in MMLU's 57"):
        mmlu.choose_subjects(folder, ["anatomyy"], "val")
    assert mmlu.choose_subjects(folder, None, "val") == ["anatomy", "philosophy"]
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "virology_val.csv").write_text("a question,1,2,3,4,E\n")
    with pytest.raises(UserFacingError, match=r"virology_val.csv:1: answer .E. is not a letter A-D"):
        mmlu.read_subject(tmp_path, "virology", "val")


@pytest.fixture(scope="module")
def smollm2(default_model):
    model, tokenizer = default_model
    return model.eval(), tokenizer


def test_builtin_scorer_and_lm_eval_give_the_same_numbers(smollm2):
    """On the real MMLU (two subjects, four questions each): the same prompts, log-likelihoods
    within 5e-5 (fp32 rounding), the same answers. The builtin scorer is what runs without lm-eval installed."""
    pytest.importorskip("lm_eval")
    from llm_lightning.tools.evaluate_benchmarks import mmlu_builtin, mmlu_with_lm_eval
    import lm_eval
    from llm_lightning.lm_eval_backend import LLMLightningLM

    folder = SHARED_DATA / "mmlu"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    model, tokenizer = smollm2
    subjects = ["abstract_algebra", "high_school_european_history"]  # the shortest prompts and the longest
    benchmark = mmlu.read_benchmark(folder, subjects, shots=5, limit=4)
    builtin = mmlu_builtin(model, tokenizer, benchmark.subjects, batch_size=3)
    through_lm_eval = mmlu_with_lm_eval(model, tokenizer, benchmark, batch_size=3)
    assert builtin == through_lm_eval and len(builtin[1]) == 8

    output = lm_eval.simple_evaluate(model=LLMLightningLM(model, tokenizer, batch_size=3),
                                     tasks=mmlu.lm_eval_tasks(folder, subjects, "val", 5), limit=4, log_samples=True)
    for subject in subjects:
        prefix = mmlu.few_shot_prefix(subject, mmlu.read_subject(folder, subject, "dev")[:5])
        for sample, question in zip(sorted(output["samples"][f"mmlu_local_{subject}"], key=lambda s: s["doc_id"]),
                                    mmlu.read_subject(folder, subject, "val")):
            contexts = [args[0] for args in sample["arguments"]]
            assert contexts == [prefix + question.text()] * 4
            ours = continuation_logprobs(model, [encode_pair(tokenizer, contexts[0], f" {x}") for x in mmlu.LETTERS])
            for (theirs, _), (mine, _) in zip([r[0] for r in sample["resps"]], ours):
                # Packed rows after a cached prefix against one forward per request: fp32 rounding
                # differs with the split (1.1e-5 seen on a Zen 4 with oneDNN's products, 1.5k tokens).
                assert theirs == pytest.approx(mine, abs=5e-5)


def test_auto_harness_falls_back_to_the_builtin_scorer_without_lm_eval(monkeypatch):
    from llm_lightning.harness import lm_eval_backend
    from llm_lightning.tools.evaluate_benchmarks import chosen_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the eval extra sees
    monkeypatch.delitem(sys.modules, "llm_lightning.lm_eval_backend", raising=False)
    assert importlib.util.find_spec("lm_eval") is None
    mmlu_in = EvaluateDataOverrides(path="x")
    assert chosen_harness(EvaluateSettings(task=Task.mmlu, data=mmlu_in)) == "builtin"
    with pytest.raises(UserFacingError, match=r'lm-evaluation-harness could not be imported .*pip install -e "\.\[eval\]"'):
        chosen_harness(EvaluateSettings(task=Task.mmlu, data=mmlu_in, harness=Harness.lm_eval))
    with pytest.raises(UserFacingError, match="could not be imported"):
        lm_eval_backend()


def test_evaluate_cli_puts_base_and_tuned_side_by_side(tmp_path, tiny_tokenizer_dir, folder):
    base = save_hf_dir(make_hf_llama(n_kv_heads=2), tmp_path / "base", tiny_tokenizer_dir)
    run_train(f"model.source={base}", "model.preset=tiny", "logger=none", "trainer.max_epochs=1",
              "trainer.limit_train_batches=2", "data.max_seq_length=128", "data.val_size=4", "lora.r=4",
              "optimizer.lr=3e-2", "scheduler.warmup_steps=0", run_dir=tmp_path / "run")
    output = tmp_path / "mmlu.json"
    printed = run_tool("evaluate", "task=mmlu", f"data.path={folder}", f"ckpt_path={tmp_path / 'run'}",
                       f"model.source={base}", "num_fewshot=2", "harness=builtin", f"output={output}",
                       "logger=wandb", f"logger.save_dir={tmp_path}")  # offline: no wandb login here
    results = json.loads(output.read_text())
    assert results["questions"] == 4 and results["shots"] == 2 and results["harness"] == "builtin"
    assert set(results["per_subject"]) == {"anatomy", "philosophy"}
    assert set(results["base"]["per_category"]) == {"STEM", "humanities"}
    assert results["accuracy"] == sum(results["per_subject"][s] * n for s, n in (("anatomy", 3), ("philosophy", 1))) / 4
    assert "| benchmark | group | questions | base | fine_tuned |" in printed.stdout
    assert "questions/s" in printed.stdout
    assert printed.stdout.strip().splitlines()[-1] == f"results: {output}"
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["benchmark", "group", "questions", "base", "fine_tuned"]
    assert table["data"][0][:3] == ["MMLU accuracy", "all", 4] and table["data"][0][4] == results["accuracy"]
