"""Every user mistake, through the real entry points: one ``error:`` line on stderr naming what was
wrong, where and what was expected; exit code 2; no traceback; and an exit within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train_runner import REPO, TINY

#: Generous for a 2-core CI machine: the imports alone take a few seconds there.
SECONDS = 60

# (tool, arguments, what the error line must contain); {tmp} and {gguf} are filled in below.
CASES = [
    ("generate", ["top_k=-3"], "top_k=-3: expected an integer >= 0"),
    ("generate", ["top_p=1.5"], "top_p=1.5: expected a number in (0, 1]"),
    ("generate", ["top_p=0", "temperature=0.8"], "top_p=0.0: expected a number in (0, 1]"),
    ("generate", ["temperature=-1"], "temperature=-1.0: expected a number >= 0"),
    ("generate", ["max_new_tokens=0"], "max_new_tokens=0: expected an integer >= 1"),
    ("generate", ["num_beams=0"], "num_beams=0: expected an integer >= 1"),
    ("generate", ["num_beams=2", "temperature=0.7"], "temperature=0.7 with num_beams=2"),
    ("generate", ["num_beams=2", "top_k=5"], "top_k=5 with num_beams=2"),
    ("generate", ["repetition_penalty=0"], "repetition_penalty=0.0: expected a number > 0"),
    ("generate", ["batch_size=0"], "batch_size=0: expected an integer >= 1"),
    ("generate", ["dtype=float64x"], "Invalid value 'float64x', expected one of [float32, bfloat16, float16]"),
    ("generate", ["dtype=float16"], "dtype=float16 on CPU"),
    ("generate", ["device=cudax"], "device=cudax: expected cpu, cuda, cuda:N or mps"),
    ("generate", ["template=chatt"], "Invalid value 'chatt', expected one of [auto, alpaca, chatml, llama2, llama3, none]"),
    ("generate", ["top_k=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    ("generate", ["tempreature=0.5"], "Could not override 'tempreature'"),
    ("generate", ["model=/tmp"], "point at weights with model.source=PATH"),
    ("generate", ["prompt="], "prompt is empty"),
    ("generate", ["compare=true"], "compare=true needs ckpt_path"),
    ("generate", ["prompts_file={tmp}/missing.txt"], "missing.txt: prompts file not found"),
    ("generate", ["prompts_file={tmp}/empty.txt"], "empty.txt: no prompts"),
    ("generate", ["model.source={tmp}/nowhere"], "nowhere: no such file or directory"),
    ("generate", ["model.source={tmp}"], "not a recognised checkpoint"),
    ("generate", ["model.source={tmp}/truncated.gguf"], "not a readable GGUF file"),
    ("generate", ["ckpt_path={tmp}/missing.ckpt"], "missing.ckpt: no such checkpoint file"),
    ("generate", ["ckpt_path={tmp}/corrupt.ckpt"], "corrupt.ckpt: not a readable training checkpoint"),
    ("generate", ["ckpt_path={tmp}/foreign.ckpt"], "foreign.ckpt: not an llm_lightning training checkpoint"),
    ("generate", ["model=tiny", "model.overrides.vocab_size=512"], "tokenizer has 49152 tokens but model preset tiny"),
    ("train", [*TINY, "trainer.precision=16-true"], "16-true: fp16 weights and gradients without loss scaling"),
    ("train", [*TINY, "trainer.precision=16-mixed"], "16-mixed needs a GPU"),
    ("train", [*TINY, "trainer.precision=fp8"], "trainer.precision=fp8: expected one of 32-true"),
    ("train", [*TINY, "data.path={tmp}/missing.json"], "missing.json: data file not found"),
    ("train", [*TINY, "data.batch_size=abc"], "could not be converted to Integer"),
    ("train", [*TINY, "data.batchsize=2"], "Could not override 'data.batchsize'"),
    ("train", [*TINY, "trainer.max_epoch=2"], "Could not override 'trainer.max_epoch'"),
    ("train", [*TINY, "data.path={tmp}/bad.json"], "bad.json: invalid JSON at line 2, column 18"),
    ("train", [*TINY, "data.path={tmp}/empty.json"], "no valid records"),
    ("train", [*TINY, "data.max_seq_length=16"], "every training example is longer than data.max_seq_length=16"),
    ("train", [*TINY, "data.template=chatt"], "data.template=chatt: expected one of auto, alpaca, chatml, llama2, llama3, none"),
    ("train", [*TINY, "data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
    ("train", [*TINY, "data.format=xml"], "data.format=xml: expected one of auto, alpaca, messages, sharegpt"),
    ("train", [*TINY, "data.path={tmp}/chat.json"], "chat.json: record 1 field 'messages[1].role' is 'robot'"),
    ("train", [*TINY, "data.template=llama3"], "template=llama3 needs the special tokens <|start_header_id|>"),
    ("train", [*TINY, "lora.targets=[q_proj]"], "unknown LoRA target 'q_proj'"),
    ("train", [*TINY, "lora.r=0"], "lora: LoRA rank r must be positive"),
    ("train", [*TINY, "lora.base_quant=int4"], "lora: base_quant=int4: expected null or one of nf4"),
    ("train", [*TINY, "trainer=fsdp", "trainer.accelerator=cpu", "stage=rm", "data=preferences",
               "data.path={tmp}/pairs.json"], "stage=rm with trainer=fsdp: the reward head is not sharded"),
    ("train", ["logger=none", "model=llama2_7b"], "model.source is required for preset llama2-7b"),
    ("train", [*TINY, "model=llama9"], "Could not find 'model/llama9'"),
    ("train", [*TINY, "ckpt_path={tmp}/missing.ckpt"], "missing.ckpt: no such checkpoint file"),
    ("train", [*TINY, "ckpt_path={tmp}/corrupt.ckpt"], "corrupt.ckpt"),
    ("train", [*TINY, "stage=dpo"], "stage=dpo: expected preference data (data=preferences)"),
    ("train", [*TINY, "data=preferences", "data.path={tmp}/pairs.json"], "train on them with stage=dpo"),
    ("train", [*TINY, "stage=dpo", "data=preferences"], "data.path: preference training needs a file of pairs"),
    ("train", [*TINY, "stage=dpo", "data=preferences", "data.path={tmp}/pairs.json"],
     "pairs.json: record 1 lacks field 'rejected'"),
    ("train", [*TINY, "stage=dpo", "data=preferences", "data.format=messages"],
     "data.format=messages: expected one of auto, sharegpt, flat, alpaca"),
    ("train", [*TINY, "stage=dpo", "dpo.beta=0"], "dpo.beta=0.0: expected a number > 0"),
    ("train", [*TINY, "stage=dpo", "dpo.loss_type=kto"], "Invalid value 'kto', expected one of [sigmoid, ipo, hinge]"),
    ("train", [*TINY, "stage=rm"], "stage=rm: expected preference data (data=preferences)"),
    ("train", [*TINY, "stage=rm", "data=preferences", "data.path={tmp}/margin.json"],
     "margin.json: record 0 field 'margin' is 'big', expected a finite number"),
    ("llm_lightning.score", ["input={tmp}/pairs.json"], "score needs ckpt_path=..."),
    ("llm_lightning.score", ["ckpt_path={tmp}/foreign.ckpt"], "score needs input=FILE"),
    ("llm_lightning.score", ["ckpt_path={tmp}/foreign.ckpt", "input={tmp}/unanswered.json"],
     "unanswered.json: record 0 ends with a user turn; expected the assistant's answer"),
    ("llm_lightning.score", ["ckpt_path={tmp}/sft.ckpt", "input={tmp}/answers.json"],
     "sft.ckpt: trained with stage=sft, not a reward model (stage=rm)"),
    ("evaluate", [], "evaluate needs ckpt_path=..."),
    ("evaluate", ["ckpt_path={tmp}/missing.ckpt", "split=test"], "Invalid value 'test', expected one of [val, all]"),
    ("evaluate", ["ckpt_path={tmp}/corrupt.ckpt"], "corrupt.ckpt: not a readable training checkpoint"),
    ("evaluate", ["ckpt_path={tmp}/missing.ckpt"], "missing.ckpt: no such checkpoint file"),
    ("evaluate", ["ckpt_path={tmp}"], "a directory without checkpoints/last.ckpt or adapter_config.json"),
    ("evaluate", ["ckpt_path=last", "name=no_such_experiment"], "ckpt_path=last: no */checkpoints/last.ckpt"),
    ("evaluate", ["ckpt_path={tmp}/foreign.ckpt", "max_examples=0"], "max_examples=0: expected an integer >= 1"),
    ("evaluate", ["ckpt_path={tmp}/foreign.ckpt", "data.template=x"], "data.template=x: expected one of"),
    ("evaluate", ["task=mmlu"], "task=mmlu needs data.path=FOLDER"),
    ("evaluate", ["task=gsm8k"], "Invalid value 'gsm8k', expected one of [mmlu]"),
    ("evaluate", ["task=mmlu", "data.path={tmp}"], "no dev/ folder; MMLU needs the original release's layout"),
    ("evaluate", ["task=mmlu", "data.path={tmp}", "limit=0"], "limit=0: expected an integer >= 1"),
    ("evaluate", ["tasks=[hellaswag]", "harness=builtin"], "they need harness=lm_eval (or auto)"),
    ("export", ["ckpt_path={tmp}/missing.ckpt", "format=onnx", "output_dir={tmp}/out"],
     "Invalid value 'onnx', expected one of [hf, peft, meta]"),
    ("export", ["format=hf"], "export needs ckpt_path=..."),
    ("export", ["ckpt_path={tmp}/foreign.ckpt"], "export needs output_dir=DIR"),
    ("export", ["ckpt_path={tmp}/foreign.ckpt", "output_dir={tmp}/out"], "not an llm_lightning training checkpoint"),
    ("export", ["ckpt_path={tmp}/missing.ckpt", "output_dir={tmp}/out"], "missing.ckpt: no such checkpoint file"),
    ("export", ["ckpt_path={tmp}/corrupt.ckpt", "output_dir={tmp}/out", "model.source={tmp}/nowhere"],
     "nowhere: no such file or directory"),
]



@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, default_gguf_path) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n\n")
    (root / "empty.json").write_text("[]")
    (root / "bad.json").write_text('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": }]')
    (root / "chat.json").write_text('[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                    '"content": "b"}]}, {"messages": [{"role": "user", "content": "a"}, '
                                    '{"role": "robot", "content": "b"}]}]')
    (root / "pairs.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]')
    (root / "margin.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}]')
    (root / "answers.json").write_text('[{"prompt": "a", "response": "b"}]')
    (root / "unanswered.json").write_text('[{"messages": [{"role": "user", "content": "a"}]}]')
    torch.save({"lora_config": {"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["wq"]}, "state_dict": {},
                "stage": "sft"}, root / "sft.ckpt")
    (root / "corrupt.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"epoch": 1, "weights": torch.zeros(2)}, root / "foreign.ckpt")
    (root / "truncated.gguf").write_bytes(default_gguf_path.read_bytes()[:4096])
    return root


@pytest.mark.parametrize(("tool", "arguments", "expected"), CASES,
                         ids=[f"{tool}:{' '.join(a for a in args if a not in TINY)}" for tool, args, _ in CASES])
def test_bad_input_gives_one_line_and_exit_2(tool, arguments, expected, bad_files, tmp_path):
    arguments = [a.format(tmp=bad_files) for a in arguments]
    if tool == "train":
        arguments.append(f"hydra.run.dir={tmp_path / 'run'}")
    start = time.perf_counter()
    command = ["-m", tool] if tool.startswith("llm_lightning.") else [f"{tool}.py"]
    result = subprocess.run([sys.executable, *command, *arguments], cwd=REPO,
                            capture_output=True, text=True, timeout=SECONDS * 2,
                            env={**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": ""})
    elapsed = time.perf_counter() - start
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert elapsed < SECONDS
