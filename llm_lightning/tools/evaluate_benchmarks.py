"""``python evaluate.py task=mmlu data.path=FOLDER`` and ``python evaluate.py tasks=[...]``: benchmarks.

The model is the base, and with ``ckpt_path`` also the base with the run's adapter: each benchmark
then runs twice, the adapter switched off and on, and the two sit side by side (did tuning damage
general knowledge?). The top-level numbers of the JSON are the tuned model's (the base's when there
is no adapter), and ``base`` holds the base's.

MMLU is scored by lm-eval over the local CSVs (``mmlu.lm_eval_tasks``) when ``harness`` is
``lm_eval``, or ``auto`` and lm-eval is installed, and by the builtin scorer otherwise. Both build the
same prompts and the same requests, scored by ``loglikelihood.continuation_logprobs``, so the two
give the same numbers (tested). ``tasks`` are lm-eval's own task names, or paths of task YAML files.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from llm_lightning.adapter import load_adapter
from llm_lightning.checkpoint_paths import resolve_checkpoint
from llm_lightning.harness import lm_eval_backend
from llm_lightning.loading import load_base_model
from llm_lightning.loglikelihood import continuation_logprobs, encode_pair
from llm_lightning.errors import UserFacingError
from llm_lightning.lora import lora_disabled
from llm_lightning.mmlu import (
    CATEGORY_SUBJECTS, LETTERS, Benchmark, Subject, few_shot_prefix, lm_eval_tasks, read_benchmark, summarize,
)
from llm_lightning.settings import EvaluateSettings, Harness, Task
from llm_lightning.tools.eval_report import Table, report

MMLU_SHOTS = 5


def evaluate_benchmarks(settings: EvaluateSettings) -> dict:
    harness = chosen_harness(settings)
    benchmark = None
    if settings.task == Task.mmlu:  # every file is checked before the weights load
        shots = MMLU_SHOTS if settings.num_fewshot is None else settings.num_fewshot
        benchmark = read_benchmark(Path(settings.data.path).expanduser(), settings.subjects, shots, settings.limit)
    model, tokenizer = load_base_model(settings.model)
    path = resolve_checkpoint(settings.ckpt_path, name=settings.name) if settings.ckpt_path else None
    if path:
        load_adapter(model, tokenizer, path, force=settings.force_adapter_load)
    model.eval()
    variants = {"base": lora_disabled(model), "fine_tuned": contextlib.nullcontext()} if path else \
        {"base": contextlib.nullcontext()}
    scores = {}
    for name, switch in variants.items():
        with switch:
            scores[name] = {}
            if benchmark:
                scores[name].update(mmlu(model, tokenizer, benchmark, harness=harness, batch_size=settings.batch_size))
            if settings.tasks:
                scores[name]["lm_eval"] = lm_eval_results(model, tokenizer, settings)
    results = {"checkpoint": str(path) if path else None, "model": settings.model.source or settings.model.preset,
               "harness": harness, **scores[list(variants)[-1]]}
    if path:
        results["base"] = scores["base"]
    return report(results, results_table(scores, settings), settings.output, settings.logger)


def chosen_harness(settings: EvaluateSettings) -> str:
    """builtin or lm_eval; ``auto`` takes lm-eval when it imports, else the builtin scorer."""
    if settings.harness == Harness.builtin:
        return "builtin"
    if settings.harness == Harness.lm_eval or settings.tasks:
        lm_eval_backend()  # one line on how to install it when it is missing
        return "lm_eval"
    try:
        lm_eval_backend()
        return "lm_eval"
    except UserFacingError:
        return "builtin"


def mmlu(model, tokenizer, benchmark: Benchmark, *, harness: str, batch_size: int) -> dict:
    started = time.perf_counter()
    if harness == "lm_eval":
        asked, correct = mmlu_with_lm_eval(model, tokenizer, benchmark, batch_size)
    else:
        asked, correct = mmlu_builtin(model, tokenizer, benchmark.subjects, batch_size)
    seconds = time.perf_counter() - started
    print(f"MMLU: {len(correct)} questions in {seconds:.1f} s, {len(correct) / seconds:.2f} questions/s")
    return {"task": "mmlu", "data": str(benchmark.folder), "split": benchmark.split, "shots": benchmark.shots,
            **summarize(asked, correct),
            "seconds": round(seconds, 1), "questions_per_second": round(len(correct) / seconds, 3)}


def mmlu_builtin(model, tokenizer, subjects: list[Subject], batch_size: int) -> tuple[list[str], list[bool]]:
    """Each question's four requests (its prompt, then " A" .. " D"); the answer is the likeliest."""
    requests, asked, answers = [], [], []
    for subject in subjects:
        prefix = few_shot_prefix(subject.name, subject.exemplars)
        for question in subject.questions:
            requests += [encode_pair(tokenizer, prefix + question.text(), f" {letter}") for letter in LETTERS]
            asked.append(subject.name)
            answers.append(question.answer)
    scores = [logprob for logprob, _ in continuation_logprobs(model, requests, batch_size=batch_size)]
    chosen = [max(range(4), key=lambda k: scores[4 * i + k]) for i in range(len(answers))]
    return asked, [LETTERS[k] == answer for k, answer in zip(chosen, answers)]


def mmlu_with_lm_eval(model, tokenizer, benchmark: Benchmark, batch_size: int) -> tuple[list[str], list[bool]]:
    """The same questions through lm-eval's task configs (``limit`` as the subjects were read)."""
    import lm_eval

    backend = lm_eval_backend().LLMLightningLM(model, tokenizer, batch_size=batch_size)
    names = [subject.name for subject in benchmark.subjects]
    limit = max(len(subject.questions) for subject in benchmark.subjects)
    tasks = lm_eval_tasks(benchmark.folder, names, benchmark.split, benchmark.shots)
    output = lm_eval.simple_evaluate(model=backend, tasks=tasks,
                                     limit=limit, log_samples=True, verbosity="WARNING")
    asked, correct = [], []
    for name in names:
        samples = sorted(output["samples"][f"mmlu_local_{name}"], key=lambda s: s["doc_id"])
        asked += [name] * len(samples)
        correct += [bool(s["acc"]) for s in samples]
    return asked, correct


def lm_eval_results(model, tokenizer, settings: EvaluateSettings) -> dict:
    """lm-eval's metrics per task (``acc,none`` and the like, standard errors included)."""
    import lm_eval

    backend = lm_eval_backend().LLMLightningLM(model, tokenizer, batch_size=settings.batch_size)
    output = lm_eval.simple_evaluate(model=backend, tasks=list(settings.tasks), limit=settings.limit,
                                     num_fewshot=settings.num_fewshot, verbosity="WARNING")
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in output["results"].items()}


def results_table(scores: dict[str, dict], settings: EvaluateSettings) -> Table:
    names = list(scores)
    rows = []
    first = scores[names[0]]
    if settings.task == Task.mmlu:
        rows.append(["MMLU accuracy", "all", first["questions"], *(scores[n]["accuracy"] for n in names)])
        for category in CATEGORY_SUBJECTS:
            if category in first["per_category"]:
                rows.append(["MMLU accuracy", category, None, *(scores[n]["per_category"][category] for n in names)])
    for task, metrics in first.get("lm_eval", {}).items():
        for metric in metrics:
            if "stderr" not in metric and metric not in ("sample_len",):
                rows.append([task, metric, None, *(scores[n]["lm_eval"][task][metric] for n in names)])
    title = f"{settings.model.source or settings.model.preset}" + (f" + {settings.ckpt_path}" if len(names) > 1 else "")
    return Table(title, ["benchmark", "group", "questions", *names], rows)
