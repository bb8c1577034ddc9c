"""MMLU from a local copy of the original release: its files, its 5-shot prompt, its categories.

The folder holds ``dev/{subject}_dev.csv`` (the exemplars) and ``val/{subject}_val.csv`` or
``test/{subject}_test.csv`` (the questions), rows without a header: question, A, B, C, D, answer.
The prompt is the one lm-eval's ``mmlu`` task writes: a description naming the subject, the
subject's first ``shots`` dev rows answered, then the question ending in "Answer:". A choice is
scored by the log-probability of " A", " B", " C" or " D" after it. Subjects fall into lm-eval's four
categories (it files anatomy under STEM, where the paper's table has it under "other").
Accuracy overall and per category is the mean over questions, as lm-eval's ``mmlu`` group gives it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llm_lightning.errors import UserFacingError

LETTERS = ("A", "B", "C", "D")
CATEGORY_SUBJECTS = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ).split(),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions"
    ).split(),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ).split(),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ).split(),
}
CATEGORY = {subject: category for category, subjects in CATEGORY_SUBJECTS.items() for subject in subjects}
SUBJECTS = tuple(sorted(CATEGORY))
EVAL_SPLITS = ("val", "test")  # the first one the folder has


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A" .. "D"

    def text(self) -> str:
        """The question as the prompt shows it, ending in "Answer:"."""
        lines = [self.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, self.choices)]
        return "\n".join(lines) + "\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def few_shot_prefix(subject: str, exemplars: Sequence[Question]) -> str:
    """The description and the answered exemplars: what every question of the subject starts with."""
    return description(subject) + "".join(f"{q.text()} {q.answer}\n\n" for q in exemplars)


LAYOUT = "the original release's layout (dev/, and val/ or test/, with {subject}_{split}.csv files)"


def eval_split(folder: Path) -> str:
    """The split the questions come from: val/ if the folder has it, else test/."""
    if not (folder / "dev").is_dir():
        raise UserFacingError(f"{folder}: no dev/ folder; MMLU needs {LAYOUT}")
    for split in EVAL_SPLITS:
        if (folder / split).is_dir():
            return split
    raise UserFacingError(f"{folder}: no val/ or test/ folder of MMLU questions; expected {LAYOUT}")


def read_subject(folder: Path, subject: str, split: str) -> list[Question]:
    path = folder / split / f"{subject}_{split}.csv"
    if not path.is_file():
        raise UserFacingError(f"{path}: missing; every subject needs dev/{subject}_dev.csv and "
                              f"{split}/{subject}_{split}.csv in {folder}")
    questions = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 6:
                raise UserFacingError(f"{path}:{line}: expected 6 fields (question, A, B, C, D, answer), "
                                      f"got {len(row)}")
            if row[5].strip() not in LETTERS:
                raise UserFacingError(f"{path}:{line}: answer {row[5]!r} is not a letter A-D (a header row? "
                                      "the files have none)")
            questions.append(Question(subject, row[0], tuple(row[1:5]), row[5].strip()))
    return questions


def choose_subjects(folder: Path, subjects: Sequence[str] | None, split: str) -> list[str]:
    """The asked subjects, each checked against MMLU's 57; None: every subject the folder holds."""
    if not subjects:
        subjects = sorted(p.name.removesuffix(f"_{split}.csv") for p in (folder / split).glob(f"*_{split}.csv"))
    unknown = sorted(set(subjects) - set(SUBJECTS))
    if unknown:
        raise UserFacingError(f"subjects: {', '.join(unknown)} not in MMLU's 57 (e.g. {', '.join(SUBJECTS[:3])})")
    if not subjects:
        raise UserFacingError(f"{folder / split}: no {{subject}}_{split}.csv files")
    return list(subjects)


@dataclass(frozen=True)
class Subject:
    name: str
    exemplars: list[Question]  # the dev rows the prompt shows answered
    questions: list[Question]


@dataclass(frozen=True)
class Benchmark:
    """What one MMLU run scores: the folder and split it read, the shots, the subjects' questions."""

    folder: Path
    split: str
    shots: int
    subjects: list[Subject]


def read_benchmark(folder: Path, subjects: Sequence[str] | None, shots: int, limit: int | None) -> Benchmark:
    """Every file read and checked, before any weights load."""
    split = eval_split(folder)
    chosen = [Subject(name, read_subject(folder, name, "dev")[:shots], read_subject(folder, name, split)[:limit])
              for name in choose_subjects(folder, subjects, split)]
    if not any(subject.questions for subject in chosen):
        raise UserFacingError(f"{folder / split}: no MMLU questions to score in the chosen subjects")
    return Benchmark(folder, split, shots, chosen)


def summarize(subjects: Sequence[str], correct: Sequence[bool]) -> dict:
    """Accuracy over all questions, per subject and per category, each the mean over its questions."""
    def mean(flags: list[bool]) -> float:
        return sum(flags) / len(flags)

    by_subject: dict[str, list[bool]] = {}
    for subject, hit in zip(subjects, correct):
        by_subject.setdefault(subject, []).append(hit)
    by_category: dict[str, list[bool]] = {}
    for subject, hits in by_subject.items():
        by_category.setdefault(CATEGORY[subject], []).extend(hits)
    return {
        "accuracy": mean(list(correct)),
        "questions": len(correct),
        "per_category": {c: mean(by_category[c]) for c in CATEGORY_SUBJECTS if c in by_category},
        "per_subject": {s: mean(hits) for s, hits in sorted(by_subject.items())},
    }


def lm_eval_tasks(folder: Path, subjects: Sequence[str], split: str, shots: int) -> list[dict]:
    """One lm-eval task config per subject over the local CSVs, writing the prompt above. Every
    field is read as text (no number or "None" parsing), so lm-eval sees the strings we do."""
    from datasets import Features, Value

    columns = ["question", *LETTERS, "answer"]
    return [{
        "task": f"mmlu_local_{subject}",
        "dataset_path": "csv",
        "dataset_kwargs": {
            "data_files": {"dev": str(folder / "dev" / f"{subject}_dev.csv"),
                           split: str(folder / split / f"{subject}_{split}.csv")},
            "column_names": columns, "features": Features({c: Value("string") for c in columns}),
            "keep_default_na": False, "na_filter": False,
        },
        "test_split": split, "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": shots, "output_type": "multiple_choice", "description": description(subject),
        "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
        "doc_to_choice": list(LETTERS), "doc_to_target": "{{answer.strip()}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    } for subject in subjects]
