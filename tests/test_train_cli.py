"""``python train.py`` end to end on a tiny model: experiments, dry run, faults, resume, DDP, sweeps."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import shared_file, write_preference_pairs
from tests.train_runner import REPO, TINY, run_tool, run_train, summary

EXPERIMENTS = ["quickstart", "chat_quickstart", "dpo_quickstart", "rm_quickstart", "lora_r8", "lora_r16", "lora_r64", "seed_llama2_7b"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment(experiment, tmp_path):
    overrides = [f"experiment={experiment}", *TINY, "debug=fast_dev_run"]
    if experiment == "seed_llama2_7b":  # no GPU, no network here: the recipe on the tiny model
        overrides += ["trainer=cpu", "trainer.precision=32-true", "data.path=null", "data.batch_size=2"]
    if experiment == "chat_quickstart":  # its data lies beside the checkout
        shared_file("glaive_toolcall_en_demo.json")
        overrides.remove("data.max_seq_length=128")
    if experiment in ("dpo_quickstart", "rm_quickstart"):
        shared_file("dpo_en_demo_240.json")
    run_train(*overrides, run_dir=tmp_path)
    result = summary(tmp_path)
    assert result["global_step"] == 1 and result["trainable_parameters"] > 0


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_dry_run_sizes_a_preference_pair_as_two_sequences(stage, tmp_path):
    sft = run_train("experiment=seed_llama2_7b", "dry_run=true", run_dir=tmp_path / "sft").stdout
    pairs = run_train("experiment=seed_llama2_7b", "dry_run=true", f"stage={stage}", "data=preferences",
                      run_dir=tmp_path / stage).stdout
    batch = int(re.search(r"batch (\d+)", sft).group(1))
    assert re.search(rf"batch {2 * batch}\b", pairs), pairs


def test_dry_run_of_the_course_recipe(tmp_path):
    result = run_train("experiment=seed_llama2_7b", "dry_run=true", run_dir=tmp_path)
    assert re.search(r"base parameters\s+6,738,415,616\n", result.stdout)
    assert re.search(r"trainable parameters\s+8,388,608  \(0.12% of base\)", result.stdout)
    assert "at precision bf16-true" in result.stdout and "activation checkpointing on" in result.stdout
    assert re.search(r"weights\s+12.58 GiB", result.stdout)  # a bf16 base: no fp32 copy of the 7B weights


def test_dry_run_under_fsdp_sizes_one_rank(tmp_path):
    """Each of 4 ranks holds a quarter of the weights and gathers the root (embeddings, head) and
    two blocks at a time: LLaMA-2-7B's blocks are 4·4096² + 3·4096·11008 bf16 weights and two
    norms, plus LoRA r16 on wq and wv in fp32."""
    result = run_train("experiment=seed_llama2_7b", "dry_run=true", "trainer=fsdp", "trainer.devices=4",
                       run_dir=tmp_path).stdout
    assert "memory per rank of 4 (FSDP) at precision bf16-true" in result
    assert re.search(r"weights\s+3.15 GiB", result)  # 12.58 / 4
    block = (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 2 + 2 * 2 * 16 * 4096 * 4
    root = (2 * 32000 * 4096 + 4096) * 2
    assert re.search(rf"gathered \(FSDP\)\s+{(2 * block + root) / 2**30:.2f} GiB", result)
    if not torch.cuda.is_available():  # devices=-1 counts GPUs: none here, so the ranks are unknown
        refused = run_train("experiment=seed_llama2_7b", "dry_run=true", "trainer=fsdp", check=False,
                            run_dir=tmp_path / "no_gpus")
        assert refused.returncode == 2 and "pass trainer.devices=N" in refused.stderr


def test_summary_checkpoints_and_csv_metrics(tmp_path):
    run_train(*[o for o in TINY if o != "logger=none"], "logger=csv", "trainer.limit_train_batches=6",
              "callbacks.last_checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1",
              "callbacks.resources.log_every_n_steps=1", run_dir=tmp_path)
    result = summary(tmp_path)
    assert result["val_loss_end"] < result["val_loss_start"]
    assert result["train_tokens_per_sec"] > 0 and result["peak_rss_gib"] > 0
    assert result["trainable_parameters"] == 2 * 8 * ((64 + 64) + (64 + 32))  # r=8 on wq (64->64), wv (64->32), 2 layers
    last = torch.load(result["last_checkpoint"], weights_only=True)
    assert last["global_step"] == result["global_step"] == 6  # last.ckpt is the final state
    assert set(last["state_dict"]) == {f"model.layers.{i}.attention.{w}.{ab}" for i in (0, 1)
                                       for w in ("wq", "wv") for ab in ("lora_a", "lora_b")}
    assert last["provenance"]["template_name"] == "alpaca" and len(last["provenance"]["base_weights"]) == 64
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_size < 2_000_000
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    columns = set(rows[0])
    for key in ("train/loss", "train/ppl", "val/loss", "val/ppl", "lr-AdamW", "train/tokens_per_sec",
                "memory/peak_rss_gib", "train/device/items_per_sec"):
        assert key in columns, sorted(columns)
    val = [r for r in rows if r["val/loss"]]
    ppl, loss = float(val[-1]["val/ppl"]), float(val[-1]["val/loss"])
    assert ppl == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)


def _final_adapter(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.kernels
@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "sft-qlora-dora"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(stage, tmp_path):
    overrides = [*TINY, "trainer.max_epochs=2", "lora.dropout=0.1", "name=resume",
                 "callbacks.last_checkpoint.every_n_train_steps=3"]
    steps = 68  # 2 epochs of 34 steps
    if stage == "sft-qlora-dora":  # an NF4 base and DoRA's magnitudes
        overrides += ["lora.base_quant=nf4", "lora.dora=true"]
        stage = "sft"
    if stage != "sft":  # 36 training pairs, 2 a batch
        pairs = write_preference_pairs(tmp_path / "pairs.json", count=40)
        overrides += [f"stage={stage}", "data=preferences", f"data.path={pairs}", "data.batch_size=2"]
        steps = 36
    run_train(*overrides, run_dir=tmp_path / "uninterrupted")

    first = tmp_path / "outputs" / "resume" / "first"
    process = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={first}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (first / "checkpoints" / "last.ckpt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < steps  # really interrupted mid-run

    second = tmp_path / "outputs" / "resume" / "second"
    run_train(*overrides, "ckpt_path=last", run_dir=second)
    assert summary(second)["resumed_from"].endswith("first/checkpoints/last.ckpt")
    expected, resumed = _final_adapter(tmp_path / "uninterrupted"), _final_adapter(second)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_adapter_onto_a_different_base_is_refused_unless_forced(tmp_path):
    run_train(*TINY, "trainer.limit_train_batches=2", run_dir=tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    refused = run_train(*TINY, "seed=7", f"ckpt_path={checkpoint}", run_dir=tmp_path / "b", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "adapter was trained with different base model weights" in refused.stderr
    run_train(*TINY, "seed=7", f"ckpt_path={checkpoint}", "force_adapter_load=true", "trainer.max_epochs=2",
              "trainer.limit_train_batches=2", run_dir=tmp_path / "c")


def test_packed_chat_data_trains_from_the_cli(tmp_path):
    data = shared_file("glaive_toolcall_en_demo.json")
    result = run_train("model=tiny", "logger=none", f"data.path={data}", "data.packing=true", "data.limit=40",
                       "data.max_seq_length=1024", "data.val_size=4", "trainer.max_steps=2", run_dir=tmp_path)
    assert "packed: 36 training examples in" in result.stdout and "supervised spans marked" in result.stdout
    run = summary(tmp_path)
    assert run["global_step"] == 2 and math.isfinite(run["val_loss_end"])
    assert torch.load(run["last_checkpoint"], weights_only=True)["provenance"]["template_name"] == "auto"


def test_two_ddp_processes_train_what_one_process_trains_with_accumulation_two(tmp_path):
    """Two gloo ranks, each taking every other batch of the one global list, against one process
    accumulating two batches a step: the same adapter (1e-5) and the same validation loss, which
    the two ranks compute on disjoint halves of the validation set."""
    same = [*TINY, "data.limit=60", "data.val_size=13", "data.batch_size=2", "lora.dropout=0",
            "trainer.max_steps=4", "callbacks.samples.num_prompts=1"]
    run_train(*same, "trainer=ddp", run_dir=tmp_path / "ddp")
    run_train(*same, "trainer.accumulate_grad_batches=2", run_dir=tmp_path / "one")
    ddp, one = summary(tmp_path / "ddp"), summary(tmp_path / "one")
    assert ddp["global_step"] == one["global_step"] == 4
    assert ddp["val_loss_start"] == pytest.approx(one["val_loss_start"], abs=1e-6)
    assert ddp["val_loss_end"] == pytest.approx(one["val_loss_end"], abs=1e-5)
    adapters = [torch.load(run["last_checkpoint"], weights_only=True)["state_dict"] for run in (ddp, one)]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(tensor, adapters[1][name], atol=1e-5, rtol=0, msg=name)
    assert not torch.equal(adapters[1]["model.layers.0.attention.wq.lora_b"], torch.zeros_like(tensor))


def test_fsdp_keeps_fp32_adapters_trains_what_one_process_trains_and_resumes_exactly(tmp_path):
    """trainer=fsdp (FSDP2) on two gloo ranks with a bf16 base: fp32 adapters and AdamW moments, the
    adapter of one process accumulating two batches, an exact resume from a mid-run checkpoint,
    sample answers at validation, and an adapter-only checkpoint that generate.py loads on one device."""
    same = [*TINY, "data.limit=60", "data.val_size=13", "data.batch_size=2", "lora.dropout=0",
            "trainer.max_steps=4", "trainer.precision=bf16-true", "callbacks.samples.num_prompts=1",
            "callbacks.samples.max_new_tokens=4"]
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
            "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.last_checkpoint.save_top_k=-1"]
    sharded = run_train(*same, *fsdp, run_dir=tmp_path / "fsdp")
    assert sharded.stdout.count("[step 0] ") == 1 and "[step 4] " in sharded.stdout  # rank 0 prints
    run_train(*same, "trainer.accumulate_grad_batches=2", run_dir=tmp_path / "one")
    fsdp_run, one = summary(tmp_path / "fsdp"), summary(tmp_path / "one")
    assert fsdp_run["global_step"] == one["global_step"] == 4
    assert fsdp_run["val_loss_end"] == pytest.approx(one["val_loss_end"], abs=1e-5)
    checkpoint = torch.load(fsdp_run["last_checkpoint"], weights_only=True)
    adapter, expected = checkpoint["state_dict"], _final_adapter(tmp_path / "one")
    assert adapter.keys() == expected.keys() and all(".lora_" in name for name in adapter)
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
    moments = [s["exp_avg"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert len(moments) == len(adapter) and {m.dtype for m in moments} == {torch.float32}

    run_train(*same, *fsdp, f"ckpt_path={tmp_path / 'fsdp' / 'checkpoints' / 'step000002.ckpt'}",
              run_dir=tmp_path / "resumed")
    resumed = _final_adapter(tmp_path / "resumed")
    for name, tensor in adapter.items():
        assert torch.equal(tensor, resumed[name]), name

    # The base is random (tiny), so its fingerprint differs between processes: force the load.
    answer = run_tool("generate", "model=tiny", f"ckpt_path={fsdp_run['last_checkpoint']}", "prompt=Hi",
                      "max_new_tokens=4", "force_adapter_load=true")
    assert "[adapter " in answer.stdout + answer.stderr and "step 4" in answer.stdout + answer.stderr


# A LoRA run on two gloo ranks whose loss turns NaN on rank 1 only, at step 2.
ONE_RANK_DIVERGES = """
import functools, sys
import lightning as L, torch
from llm_lightning import LLaMA, LLaMAConfig
from llm_lightning.data import AlpacaDataModule
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.lora import LoRAConfig, apply_lora
from llm_lightning.module import LoRAFineTuner, NonFiniteLossError

class PoisonRankOne(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.layers[0].attention.wq.lora_b.fill_(float("nan"))

torch.manual_seed(0)
model = apply_lora(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=49152)), LoRAConfig(r=4)).train()
module = LoRAFineTuner(model, lora=LoRAConfig(r=4), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
data = AlpacaDataModule(tokenizer=embedded_tokenizer(), limit=40, val_size=4, max_seq_length=128, batch_size=2)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    enable_checkpointing=False, use_distributed_sampler=False, callbacks=[PoisonRankOne()])
try:
    trainer.fit(module, datamodule=data)
except NonFiniteLossError as error:
    print(f"rank {trainer.global_rank} stopped: {error}", flush=True)
    sys.exit(3)
"""


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    script = tmp_path / "one_rank_diverges.py"
    script.write_text(ONE_RANK_DIVERGES)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    for rank in (0, 1):  # both ranks stop at step 2 and say which rank diverged; neither waits for the other
        assert f"rank {rank} stopped: training loss became nan on rank 1 at step 2" in result.stdout, (
            result.stdout[-2000:] + result.stderr[-3000:])


def test_sweep_runs_each_job_in_its_own_dir(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "-m", "lora.r=4,8", *TINY, "debug=fast_dev_run",
                             f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {r: [d for d in tmp_path.iterdir() if f"lora.r={r}" in d.name] for r in (4, 8)}
    assert all(len(dirs) == 1 for dirs in jobs.values())
    counts = {r: json.loads((dirs[0] / "summary.json").read_text())["trainable_parameters"] for r, dirs in jobs.items()}
    assert counts[8] == 2 * counts[4]


def test_bf16_true_keeps_the_base_in_bf16_and_the_adapter_in_fp32(tmp_path):
    """Lightning's bf16-true would cast the LoRA tensors and AdamW's moments to bf16 too."""
    run_train(*TINY, "trainer.precision=bf16-true", "trainer.max_steps=3", "data.batch_size=2",
              run_dir=tmp_path)
    result = summary(tmp_path)
    assert result["global_step"] == 3 and math.isfinite(result["val_loss_end"])
    checkpoint = torch.load(result["last_checkpoint"], weights_only=True)
    assert checkpoint["state_dict"] and {t.dtype for t in checkpoint["state_dict"].values()} == {torch.float32}
    moments = [s["exp_avg"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert any(m.abs().sum() > 0 for m in moments)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_train_to_the_same_adapter(tmp_path):
    adapters = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        run_train(*TINY, f"compile={str(compiled).lower()}", "trainer.max_steps=3", "data.batch_size=2",
                  "trainer.limit_val_batches=0", "lora.dropout=0.0", run_dir=run_dir, timeout=600)
        state = torch.load(summary(run_dir)["last_checkpoint"], weights_only=True)["state_dict"]
        adapters[compiled] = state
    assert adapters[True].keys() == adapters[False].keys() and len(adapters[True]) > 0
    for name, tensor in adapters[False].items():
        torch.testing.assert_close(adapters[True][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_from_a_supervised_adapter_starts_at_it_and_uses_it_as_reference(tmp_path):
    """The policy starts from ``dpo.reference``, which is also the reference: the loss starts at log 2."""
    run_train(*TINY, "lora.r=4", "lora.targets=[wq,wk]", "trainer.limit_train_batches=3", run_dir=tmp_path / "sft")
    pairs = write_preference_pairs(tmp_path / "pairs.json", count=12)
    run_train(*TINY, "stage=dpo", "data=preferences", f"data.path={pairs}", "data.val_size=4",
              f"dpo.reference={tmp_path / 'sft'}", "trainer.max_steps=2", run_dir=tmp_path / "dpo")
    sft, dpo = summary(tmp_path / "sft"), summary(tmp_path / "dpo")
    assert dpo["val_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0 <= dpo["val_reward_accuracy_end"] <= 1 and "val_reward_accuracy_end" not in sft
    assert dpo["trainable_parameters"] == sft["trainable_parameters"] and dpo["global_step"] == 2
    adapter = torch.load(dpo["last_checkpoint"], weights_only=True)["state_dict"]
    assert {k.rsplit(".", 2)[-2] for k in adapter} == {"wq", "wk"}
