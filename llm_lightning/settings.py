"""Typed settings for the Hydra entry points, registered in Hydra's ConfigStore.

A config file in ``conf/`` fills these dataclasses, so a value of the wrong type or an unknown
name (dtype, template) is refused while Hydra composes the config, and ``to_settings`` builds the
dataclasses once, running each one's checks (``__post_init__``) before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from llm_lightning.errors import SettingError
from llm_lightning.lora import LoRAConfig
from llm_lightning.data.preferences import PREFERENCE_FORMATS
from llm_lightning.loss import TOKEN_WEIGHTINGS
from llm_lightning.preference_loss import LOSS_TYPES, DPOConfig
from llm_lightning.data.conversations import FORMATS
from llm_lightning.prompts import TEMPLATE_NAMES
from llm_lightning.sampling import SamplingOptions

DType = Enum("DType", {name: name for name in ("float32", "bfloat16", "float16")})
TemplateName = Enum("TemplateName", {name: name for name in TEMPLATE_NAMES})
Quantize = Enum("Quantize", {name: name for name in ("auto", "int8", "int4")})
TokenWeighting = Enum("TokenWeighting", {name: name for name in TOKEN_WEIGHTINGS})
Stage = Enum("Stage", {name: name for name in ("sft", "dpo", "rm")})
DPOLoss = Enum("DPOLoss", {name: name for name in LOSS_TYPES})
PREFERENCE_DATA = "llm_lightning.data.PreferenceDataModule"


@dataclass
class ModelSettings:
    """The ``model`` group: a preset's shape, and the weights to load (``source``) or random ones."""

    preset: str = "smollm2-135m"
    source: Optional[str] = None  # null: the embedded default (smollm2-135m only); or a Meta/HF dir or .gguf file
    tokenizer: Optional[str] = None
    random_init: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False


@dataclass
class LoRASettings:
    """The ``lora`` group, checked by building the ``LoRAConfig`` it describes."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])
    dora: bool = False
    base_quant: Optional[str] = None  # nf4: QLoRA's 4-bit base (needs the qlora extra)

    def __post_init__(self) -> None:
        self.config = lora_config(self)


def lora_config(lora: Any) -> LoRAConfig:
    """``LoRAConfig`` from the ``lora`` group's settings (a DictConfig or ``LoRASettings``)."""
    try:
        return LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets),
                          dora=bool(getattr(lora, "dora", False)), base_quant=getattr(lora, "base_quant", None))
    except ValueError as exc:
        raise SettingError(f"lora: {exc}") from None


@dataclass
class DataSettings:
    """The ``data`` group: ``AlpacaDataModule``'s arguments (see conf/data/alpaca.yaml)."""

    _target_: str = "llm_lightning.data.AlpacaDataModule"
    path: Optional[str] = None
    sha256: Optional[str] = None
    cache_dir: Optional[str] = None
    format: str = "auto"
    template: Optional[str] = None  # a str, not TemplateName: it is handed to AlpacaDataModule as it is
    max_seq_length: int = 512
    train_on_inputs: bool = False
    val_size: float = 0.1
    limit: Optional[int] = None
    skip_invalid: bool = False
    batch_size: int = 4
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    seed: int = 42
    pad_to_multiple_of: int = 1
    group_by_length: bool = True
    packing: bool = False

    def __post_init__(self) -> None:
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise SettingError(f"data.template={self.template}: expected one of {', '.join(TEMPLATE_NAMES)}")
        formats = PREFERENCE_FORMATS if self._target_ == PREFERENCE_DATA else FORMATS
        if self.format not in formats:
            raise SettingError(f"data.format={self.format}: expected one of {', '.join(formats)}")
        for name in ("max_seq_length", "batch_size", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise SettingError(f"data.{name}={getattr(self, name)}: expected an integer >= 1")
        if self.val_size < 0:
            raise SettingError(f"data.val_size={self.val_size}: expected a fraction in [0, 1) or a count >= 1")


@dataclass
class DPOSettings:
    """The ``dpo`` block of train.yaml: the preference loss (``llm_lightning/dpo.py``)."""

    beta: float = 0.1
    loss_type: DPOLoss = DPOLoss.sigmoid
    label_smoothing: float = 0.0
    reference: Optional[str] = None  # a supervised checkpoint: the reference, and where the policy starts

    def config(self) -> DPOConfig:
        try:
            return DPOConfig(beta=self.beta, loss_type=self.loss_type.name, label_smoothing=self.label_smoothing)
        except ValueError as exc:
            raise SettingError(f"dpo.{exc}") from None

    def __post_init__(self) -> None:
        self.config()


@dataclass
class TrainSettings:
    """``train.py``: the typed groups; trainer, optimizer, scheduler, logger and callbacks are
    Lightning/PyTorch ``_target_`` configs, checked by instantiating them."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    name: str = "default"
    seed: int = 42
    ckpt_path: Optional[str] = None
    dry_run: bool = False
    force_adapter_load: bool = False
    compile: bool = False
    token_weighting: TokenWeighting = TokenWeighting.epoch
    stage: Stage = Stage.sft
    dpo: DPOSettings = field(default_factory=DPOSettings)

    def __post_init__(self) -> None:
        preference_data = self.data._target_ == PREFERENCE_DATA
        if self.stage != Stage.sft and not preference_data:
            raise SettingError(f"stage={self.stage.name}: expected preference data (data=preferences), "
                               f"got data._target_={self.data._target_}")
        if self.stage == Stage.sft and preference_data:
            raise SettingError("data=preferences holds preference pairs: train on them with stage=dpo or stage=rm")


def torch_device(name: str) -> torch.device:
    """``name`` as a device this machine has, or one line saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError(f"device={name}: expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device={name}: no CUDA GPU is available here; use device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"device={name}: MPS is not available here; use device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SettingError(f"device={name}: expected cpu, cuda, cuda:N or mps")
    return device


@dataclass
class AdapterSettings:
    """What the sampling and adapter tools share: the base model, and the adapter put on it."""

    model: ModelSettings = field(default_factory=ModelSettings)
    ckpt_path: Optional[str] = None  # a .ckpt, a run dir, a PEFT adapter dir, or last (checkpoint_paths.py)
    name: Optional[str] = None  # scopes ckpt_path=last to outputs/<name>
    force_adapter_load: bool = False


@dataclass
class GenerateSettings(AdapterSettings):
    """``generate.py``: what to load, what to ask, and how to sample (see conf/generate.yaml)."""

    prompt: str = "What is the capital of France?"
    prompts_file: Optional[str] = None
    chat: bool = False
    system: Optional[str] = None
    template: Optional[TemplateName] = None
    compare: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = 1234
    batch_size: int = 8
    device: str = "cpu"
    dtype: DType = DType.float32
    quantize: Optional[Quantize] = Quantize.auto
    pack_weights: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        self.sampling = SamplingOptions(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            num_beams=self.num_beams, repetition_penalty=self.repetition_penalty, stop=tuple(self.stop),
            seed=self.seed)
        if self.batch_size < 1:
            raise SettingError(f"batch_size={self.batch_size}: expected an integer >= 1")
        if not self.prompts_file and not self.prompt.strip():
            raise SettingError("prompt is empty: expected prompt=\"...\" or prompts_file=FILE")
        if self.chat and (self.prompts_file or self.compare or self.num_beams > 1):
            raise SettingError("chat=true streams one conversation from stdin; it takes no prompts_file, "
                               "compare or num_beams > 1")
        if self.compare and not self.ckpt_path:
            raise SettingError("compare=true needs ckpt_path=... (an adapter to compare with the base model)")
        if self.quantize is not None and self.quantize.value != "auto" and self.compare:
            raise SettingError(f"quantize={self.quantize.value} merges the adapter into quantized weights; "
                               "it cannot compare=true")
        self.torch_device = torch_device(self.device)
        self.torch_dtype = getattr(torch, self.dtype.value)
        if self.torch_dtype == torch.float16 and self.torch_device.type == "cpu":
            raise SettingError("dtype=float16 on CPU: PyTorch's CPU kernels are slow or missing in fp16; "
                               "use float32 or bfloat16")


Split = Enum("Split", {"val": "val", "all": "all"})
ExportFormat = Enum("ExportFormat", {name: name for name in ("hf", "peft", "meta")})


def _require_checkpoint(tool: str, ckpt_path: Optional[str]) -> None:
    if not ckpt_path:
        raise SettingError(f"{tool} needs ckpt_path=... (a training .ckpt, a run dir, a PEFT adapter dir, or last)")


def _require_at_least_one(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise SettingError(f"{name}={value}: expected an integer >= 1")


@dataclass
class EvaluateDataOverrides:
    """Data settings that replace those saved in the checkpoint (null: keep the saved one)."""

    path: Optional[str] = None
    template: Optional[str] = None
    max_seq_length: Optional[int] = None
    val_size: Optional[float] = None
    limit: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise SettingError(f"data.template={self.template}: expected one of {', '.join(TEMPLATE_NAMES)}")
        _require_at_least_one(**{"data.max_seq_length": self.max_seq_length, "data.limit": self.limit})


Task = Enum("Task", {"mmlu": "mmlu"})
Harness = Enum("Harness", {name: name for name in ("auto", "builtin", "lm_eval")})


@dataclass
class EvaluateSettings(AdapterSettings):
    """``evaluate.py``: which model (the base, with the adapter of ``ckpt_path`` if given), which
    examples or benchmark, and through which harness."""

    data: EvaluateDataOverrides = field(default_factory=EvaluateDataOverrides)
    split: Split = Split.val
    max_examples: Optional[int] = None
    max_new_tokens: int = 128
    batch_size: int = 8
    output: str = "eval.json"
    task: Optional[Task] = None  # mmlu: MMLU from the CSV folder data.path
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (lm-eval fetches their data)
    harness: Harness = Harness.auto  # auto: lm-eval when installed, else the builtin scorer (MMLU)
    subjects: Optional[list[str]] = None  # MMLU subjects (null: all 57)
    limit: Optional[int] = None  # questions per MMLU subject / per lm-eval task
    num_fewshot: Optional[int] = None  # null: 5 for MMLU, each lm-eval task's own default
    logger: Any = None  # a logger config (logger=wandb): the results table is logged there too

    def __post_init__(self) -> None:
        if self.task is None and not self.tasks:
            _require_checkpoint("evaluate", self.ckpt_path)
        if self.tasks and self.harness == Harness.builtin:
            raise SettingError(f"tasks={list(self.tasks)} are lm-eval tasks; they need harness=lm_eval (or auto)")
        if self.task == Task.mmlu and not self.data.path:
            raise SettingError("task=mmlu needs data.path=FOLDER (MMLU's dev/ and val/ or test/ CSV folders)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise SettingError(f"num_fewshot={self.num_fewshot}: expected an integer >= 0")
        _require_at_least_one(max_examples=self.max_examples, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, limit=self.limit)


@dataclass
class ExportSettings(AdapterSettings):
    """``export.py``: which adapter, which format, where to."""

    format: ExportFormat = ExportFormat.hf
    output_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _require_checkpoint("export", self.ckpt_path)
        if not self.output_dir:
            raise SettingError("export needs output_dir=DIR (where the exported files go)")


@dataclass
class ScoreSettings(AdapterSettings):
    """``python -m llm_lightning.score``: a reward model, the answers to score, where the scores go."""

    input: Optional[str] = None
    output: str = "scores.jsonl"
    max_seq_length: Optional[int] = None  # null: the one the reward model was trained with
    batch_size: int = 8

    def __post_init__(self) -> None:
        _require_checkpoint("score", self.ckpt_path)
        if not self.input:
            raise SettingError("score needs input=FILE (answers or preference pairs, JSON or JSONL)")
        _require_at_least_one(max_seq_length=self.max_seq_length, batch_size=self.batch_size)


def register() -> None:
    """Put the schemas where the config files name them (``defaults: [generate_schema, ...]``)."""
    store = ConfigStore.instance()
    store.store(name="generate_schema", node=GenerateSettings)
    store.store(name="train_schema", node=TrainSettings)
    store.store(name="evaluate_schema", node=EvaluateSettings)
    store.store(name="export_schema", node=ExportSettings)
    store.store(name="score_schema", node=ScoreSettings)


def to_settings(cfg: DictConfig) -> Any:
    """The composed config as its dataclasses, each one's checks run."""
    return OmegaConf.to_object(cfg)
