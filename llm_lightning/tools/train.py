"""``train(cfg)``: everything ``python train.py`` does, from the composed Hydra config.

Load the base, add LoRA, audit the data, measure validation loss before training, fit (or
resume with ``ckpt_path=last``), measure it again, and write ``summary.json`` to the run dir.
"""

from __future__ import annotations

import json
import os
import netrc
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from omegaconf import DictConfig, OmegaConf

from llm_lightning import cpu_kernels, nf4
from llm_lightning.loading import load_base_model
from llm_lightning.adapter import load_adapter, read_training_checkpoint
from llm_lightning.callbacks import ResourceMonitor, SampleGenerations
from llm_lightning.checkpoint_paths import LAST, resolve_checkpoint
from llm_lightning.config import LLaMAConfig
from llm_lightning.dry_run import estimate, format_report
from llm_lightning.errors import UserFacingError
from llm_lightning.dpo import DPOFineTuner
from llm_lightning.lora import LoRAConfig, apply_lora, count_parameters, lora_config_of, lora_state_dict
from llm_lightning.module import LoRAFineTuner
from llm_lightning.precision import HalfPrecisionFP32Adapters, Precision
from llm_lightning.provenance import build_provenance
from llm_lightning.reward_model import RewardModelFineTuner
from llm_lightning.settings import lora_config, to_settings


def runs_on_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config asks for a CUDA GPU (``auto``: when one is here)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def uses_fsdp(trainer_cfg: DictConfig) -> bool:
    return "fsdp" in str(trainer_cfg.get("strategy")).lower()


def check_fsdp_support(stage: str, lora: LoRAConfig, reference_path: str | None) -> None:
    """What ``trainer=fsdp`` does not shard yet, refused before any weights are loaded."""
    if lora.base_quant:
        raise UserFacingError("lora.base_quant=nf4 with trainer=fsdp: FSDP cannot shard the 4-bit codes; "
                              "use trainer=gpu or trainer=ddp")
    if stage == "rm":
        raise UserFacingError("stage=rm with trainer=fsdp: the reward head is not sharded, so its gradients "
                              "would not be synchronised; use trainer=ddp")
    if reference_path:
        raise UserFacingError("dpo.reference with trainer=fsdp: the reference adapter cannot be swapped into "
                              "sharded weights yet; leave dpo.reference unset (the base is the reference) or use trainer=ddp")


def check_precision(trainer_cfg: DictConfig) -> Precision:
    """``trainer.precision`` parsed once, and refused where the accelerator cannot run it."""
    precision = Precision.parse(trainer_cfg.get("precision", "32-true"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserFacingError(f"trainer.accelerator={accelerator} but no CUDA GPU is available; use trainer=cpu")
    precision.check_device(runs_on_gpu(trainer_cfg))
    return precision


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from; ``last`` is the newest of the earlier runs with this run's
    name (and, in a sweep, the same job), found next to ``output_dir``."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = resolve_checkpoint(ckpt_path)
        if path.is_dir():
            raise UserFacingError(f"ckpt_path={ckpt_path}: training resumes from a .ckpt file, not an adapter dir")
    else:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            root, pattern = output_dir.parent.parent, f"*/{hydra_cfg.sweep.subdir}/{LAST}"
        else:
            root, pattern = output_dir.parent, f"*/{LAST}"
        path = resolve_checkpoint("last", root=root, pattern=pattern)
    read_training_checkpoint(path)  # a corrupt or foreign file is one error line here, not Lightning's traceback
    return str(path)


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_logger(logger_cfg: DictConfig | None):
    if not logger_cfg:
        return False
    if "Wandb" in str(logger_cfg.get("_target_", "")) and "WANDB_MODE" not in os.environ:
        # Offline unless the user is logged in or chose a mode: a run never blocks on a login prompt.
        os.environ["WANDB_MODE"] = "online" if wandb_credentials_present() else "offline"
    return instantiate(logger_cfg)


def fsdp_ranks(trainer_cfg: DictConfig) -> int:
    """How many ranks ``trainer=fsdp`` shards over: devices per node (``-1``: the GPUs here) x nodes."""
    devices = trainer_cfg.get("devices", -1)
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif not isinstance(devices, (int, str)):  # a list of device indices
        per_node = len(devices)
    else:
        per_node = torch.cuda.device_count()
        if per_node == 0:
            raise UserFacingError(f"trainer.devices={devices} counts the GPUs of this machine, which has none; "
                                  "pass trainer.devices=N to size a run sharded over N GPUs per node")
    return per_node * int(trainer_cfg.get("num_nodes", 1))


def dry_run(cfg: DictConfig, *, pairs: bool = False) -> dict[str, Any]:
    config = LLaMAConfig.from_name(cfg.model.preset, **dict(cfg.model.get("overrides") or {}))
    lora = lora_config(cfg.lora)
    precision = Precision.parse(cfg.trainer.precision)
    checkpointing = bool(cfg.model.get("activation_checkpointing", False))
    # A preference pair is two sequences (chosen and rejected) in one forward.
    sequences = cfg.data.batch_size * (2 if pairs else 1)
    device_type = "cuda" if runs_on_gpu(cfg.trainer) else "cpu"
    shards = fsdp_ranks(cfg.trainer) if uses_fsdp(cfg.trainer) else 1
    result = estimate(config, lora, precision=precision, batch_size=sequences, seq_len=cfg.data.max_seq_length,
                      checkpointing=checkpointing, device_type=device_type, shards=shards)
    print(format_report(config.name, lora, result, precision=precision,
                        batch_size=sequences, seq_len=cfg.data.max_seq_length,
                        checkpointing=checkpointing))
    return result


def precision_arguments(precision: Precision) -> dict[str, Any]:
    """Half-precision training keeps the adapters in fp32 (see ``precision.py``), under every strategy."""
    if not precision.half_weights:
        return {"precision": precision.name}
    return {"precision": None, "plugins": [HalfPrecisionFP32Adapters(precision.name)]}


def save_final_checkpoint(trainer: L.Trainer) -> None:
    """Write the final state to ``last.ckpt``: ModelCheckpoint saves every N steps, and since
    Lightning 2.6 it refreshes ``last.ckpt`` only when that step also saved a regular checkpoint."""
    if trainer.fast_dev_run or trainer.interrupted:
        return
    for callback in trainer.checkpoint_callbacks:
        if callback.save_last and callback.dirpath:
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            callback.last_model_path = str(path)
            return


def _validation(trainer: L.Trainer, module: LoRAFineTuner, datamodule) -> dict[str, float]:
    """The validation metrics (``val/loss``; for preference stages ``val/rewards/accuracy`` too)."""
    if not datamodule.val_examples or trainer.limit_val_batches == 0:
        return {}
    return {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}


def train(cfg: DictConfig) -> dict[str, Any]:
    settings = to_settings(cfg)  # every typed group's checks, before anything is loaded
    if cfg.get("dry_run"):
        return dry_run(cfg, pairs=settings.stage.name != "sft")
    precision = check_precision(cfg.trainer)
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        print(cpu_kernels.describe())
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), output_dir)

    lora = lora_config(cfg.lora)
    reference_path = None
    if settings.dpo.reference and settings.stage.name == "dpo":
        reference_path = str(resolve_checkpoint(settings.dpo.reference).resolve())
        # The policy starts from the supervised adapter that is also the reference, so its LoRA shape rules.
        lora = LoRAConfig.from_dict(read_training_checkpoint(reference_path)["lora_config"])
    if uses_fsdp(cfg.trainer):
        check_fsdp_support(settings.stage.name, lora, reference_path)
    if lora.base_quant:
        nf4.require()
    frozen_dtype = precision.frozen_dtype(lora.base_quant is not None)
    model, tokenizer = load_base_model(cfg.model, dtype=frozen_dtype)
    if frozen_dtype != precision.weights_dtype:  # a QLoRA base under mixed precision (see precision.py)
        model.tok_embeddings.to(precision.weights_dtype)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    print(datamodule.report.format())
    provenance = build_provenance(model, tokenizer, datamodule.template)
    reference_adapter = None
    if reference_path:
        load_adapter(model, tokenizer, reference_path, force=cfg.force_adapter_load)
        lora = lora_config_of(model)
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.data = parameter.data.float()  # fp32 adapters whatever the base's dtype
        reference_adapter = {k: v.clone() for k, v in lora_state_dict(model).items()}
        print(f"dpo.reference={settings.dpo.reference}: reference and starting point, LoRA r={lora.r} "
              f"on {', '.join(lora.targets)}")
    else:
        apply_lora(model, lora, lora_dtype=torch.float32)  # fp32 adapters whatever the base's dtype
    if cfg.get("compile"):
        # Block by block, in place: parameter names (and so checkpoints) stay unchanged, and the
        # fused loss and activation checkpointing stay outside the compiled graphs.
        for block in model.layers:
            block.compile()
    model.train()  # loaders return eval mode; Lightning keeps whatever mode it is handed

    common = dict(lora=lora, optimizer=instantiate(cfg.optimizer), warmup_steps=cfg.scheduler.warmup_steps,
                  min_lr=cfg.scheduler.min_lr, provenance=provenance, force_adapter_load=cfg.force_adapter_load,
                  token_weighting=settings.token_weighting.name)
    if settings.stage.name == "dpo":
        module = DPOFineTuner(model, dpo=settings.dpo.config(), reference_adapter=reference_adapter,
                              reference_path=reference_path, reference_batch_size=datamodule.eval_batch_size, **common)
    elif settings.stage.name == "rm":
        module = RewardModelFineTuner(model, pad_id=tokenizer.pad_id, **common)
    else:
        module = LoRAFineTuner(model, **common)
    trainable, total = count_parameters(module)  # with a reward model's head
    logger = build_logger(cfg.get("logger"))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if settings.stage.name == "rm":  # a reward model's adapter is not for writing answers
        callbacks = [c for c in callbacks if not isinstance(c, SampleGenerations)]
    if not logger:  # these only report to a logger, and Lightning refuses them without one
        callbacks = [c for c in callbacks if not isinstance(c, (LearningRateMonitor, ThroughputMonitor))]
    resources = next((c for c in callbacks if isinstance(c, ResourceMonitor)), None)
    if resources is None:
        resources = ResourceMonitor()
        callbacks.append(resources)
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                         **precision_arguments(precision))
    except (MisconfigurationException, ValueError) as exc:
        raise UserFacingError(f"trainer: {exc}") from None
    if logger:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True),
                                "data_audit": datamodule.report.to_dict(),
                                "parameters": {"trainable": trainable, "total": total}})

    val_start = _validation(trainer, module, datamodule) if ckpt_path is None else {}
    # weights_only: a checkpoint to resume from is never allowed to run pickled code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    save_final_checkpoint(trainer)
    val_end = _validation(trainer, module, datamodule)

    checkpoints = trainer.checkpoint_callbacks
    summary = {
        "name": cfg.get("name"),
        "output_dir": str(output_dir),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "val_loss_start": val_start.get("val/loss"),
        "val_loss_end": val_end.get("val/loss"),
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
        **resources.summary(),
        "last_checkpoint": next((c.last_model_path for c in checkpoints if Path(c.last_model_path or "").is_file()), None),
        "best_checkpoint": next((c.best_model_path for c in checkpoints
                                 if c.monitor and Path(c.best_model_path or "").is_file()), None),
    }
    if "val/rewards/accuracy" in val_end:  # preference stages: how often a held-out chosen answer wins
        summary["val_reward_accuracy_start"] = val_start.get("val/rewards/accuracy")
        summary["val_reward_accuracy_end"] = val_end["val/rewards/accuracy"]
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary
