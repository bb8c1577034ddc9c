"""The ``llm_lightning`` lm-eval backend against lm-eval's own ``hf`` backend (transformers on the
same weights): log-likelihoods within 1e-4 and the same accuracy on a task defined here over local
files, rolling log-likelihoods over several windows, and greedy generation cut at stop strings."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from llm_lightning.lm_eval_backend import LLMLightningLM  # noqa: E402
from tests.train_runner import run_tool  # noqa: E402

# Written for this test: a multiple-choice task whose contexts share a prefix and whose choices
# are several tokens long.
QUESTIONS = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
    ("How many legs does a spider have?", ["Six", "Four", "Eight", "Ten"], 2),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Mars", "Earth"], 0),
    ("What do bees make?", ["Milk", "Honey", "Silk", "Wax paper"], 1),
    ("Which gas do plants take in?", ["Oxygen", "Helium", "Carbon dioxide", "Neon"], 2),
    ("What is frozen water called?", ["Steam", "Ice", "Fog", "Dew"], 1),
]


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_task")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (directory / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {directory / 'test.jsonl'}
        test_split: test
        output_type: multiple_choice
        description: "Answer the general knowledge question.\\n\\n"
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return directory / "tiny_mc.yaml"


@pytest.fixture(scope="module")
def backends(default_model, default_gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = default_model
    directory, name = str(default_gguf_path.parent), default_gguf_path.name
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ours = LLMLightningLM(model.eval(), tokenizer, batch_size=4, max_length=24)
    theirs = HFLM(pretrained=reference, tokenizer=reference_tokenizer, batch_size=4, max_length=24)
    return ours, theirs


def test_multiple_choice_log_likelihoods_and_accuracy_equal_the_hf_backends(backends, task_yaml):
    ours, theirs = backends
    results = [lm_eval.simple_evaluate(model=lm, tasks=[str(task_yaml)], log_samples=True) for lm in (ours, theirs)]
    for mine, reference in zip(results[0]["samples"]["tiny_mc"], results[1]["samples"]["tiny_mc"]):
        assert mine["arguments"] == reference["arguments"]
        for (logprob, greedy), (want, want_greedy) in zip([r[0] for r in mine["resps"]],
                                                            [r[0] for r in reference["resps"]]):
            assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert results[0]["results"]["tiny_mc"]["acc,none"] == results[1]["results"]["tiny_mc"]["acc,none"]


def test_chat_templated_prompts_and_log_likelihoods_equal_the_hf_backends(backends, task_yaml):
    """``--apply_chat_template``: the same rendered turns as the ``hf`` backend (a prefilled answer
    left open), and the same requests and log-likelihoods for a task."""
    ours, theirs = backends
    turns = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a fruit."}]
    prefilled = [*turns, {"role": "assistant", "content": "The fruit is "}]
    assert ours.apply_chat_template(turns) == theirs.apply_chat_template(turns)
    assert ours.apply_chat_template(turns).endswith("<|im_start|>assistant\n")
    open_answer = ours.apply_chat_template(prefilled, add_generation_prompt=False)
    assert open_answer == theirs.apply_chat_template(prefilled, add_generation_prompt=False)
    assert open_answer.endswith("<|im_start|>assistant\nThe fruit is ")
    assert ours.chat_template(True) == theirs.chat_template(True) and ours.chat_template(False) is None
    results = [lm_eval.simple_evaluate(model=lm, tasks=[str(task_yaml)], log_samples=True, apply_chat_template=True,
                                       limit=3) for lm in (ours, theirs)]
    for mine, reference in zip(results[0]["samples"]["tiny_mc"], results[1]["samples"]["tiny_mc"]):
        assert mine["arguments"] == reference["arguments"] and "<|im_start|>user" in mine["arguments"][0][0]
        for (logprob, _), (want, _) in zip([r[0] for r in mine["resps"]], [r[0] for r in reference["resps"]]):
            assert logprob == pytest.approx(want, abs=1e-4)


def test_rolling_log_likelihood_over_several_windows_equals_the_hf_backends(backends):
    ours, theirs = backends
    texts = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the green "
             "forest where nobody can find it again for many days and nights, until the winter comes "
             "and the snow covers every path that leads back to the farm.", "Short text."]
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    assert len(ours.tok_encode(texts[0])) > 2 * ours.max_length  # three windows or more
    for mine, want in zip(ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)):
        assert mine == pytest.approx(want, abs=1e-3, rel=1e-5)


def test_generate_until_stops_where_the_hf_backend_does(backends):
    ours, theirs = backends
    gen = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    prompts = ["<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", "The capital of France is"]
    requests = [Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)]
    answers = ours.generate_until(requests)
    assert answers == theirs.generate_until(requests)
    assert all(answer and "\n" not in answer and "." not in answer for answer in answers)


def test_evaluate_cli_runs_lm_eval_task_files(task_yaml, tmp_path):
    output = tmp_path / "eval.json"
    printed = run_tool("evaluate", "harness=lm_eval", f"tasks=[{task_yaml}]", "batch_size=4", f"output={output}")
    results = json.loads(output.read_text())
    assert 0.0 <= results["lm_eval"]["tiny_mc"]["acc,none"] <= 1.0 and results["checkpoint"] is None
    assert "| tiny_mc | acc,none |" in printed.stdout
    assert printed.stdout.strip().splitlines()[-1] == f"results: {output}"


def test_harness_command_line_registers_the_backend():
    printed = run_tool("llm_lightning.harness", "--help")
    assert "--model" in printed.stdout
    from lm_eval.api.registry import get_model

    assert get_model("llm_lightning") is LLMLightningLM and get_model("hf") is HFLM


def test_chat_templating_takes_the_models_template_or_a_named_one_never_plain_text(tiny_tokenizer_dir):
    """A tokenizer without a chat template: ``--apply_chat_template`` says to name one (the ``hf``
    backend refuses too) rather than join the turns as plain text; a named one renders, and the
    request cache tells templates apart."""
    from llm_lightning import LLaMA, LLaMAConfig, load_tokenizer
    from llm_lightning.errors import UserFacingError
    from tests.conftest import TINY_VOCAB

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=TINY_VOCAB))
    turns = [{"role": "user", "content": "Hi"}]
    with pytest.raises(UserFacingError, match="no chat template for --apply_chat_template; pass template=NAME"):
        LLMLightningLM(model, tokenizer).apply_chat_template(turns)
    alpaca = LLMLightningLM(model, tokenizer, template="alpaca")
    assert alpaca.apply_chat_template(turns).endswith("### Instruction:\nHi\n\n### Response:\n")
    assert alpaca.tokenizer_name != LLMLightningLM(model, tokenizer, template="llama2").tokenizer_name
