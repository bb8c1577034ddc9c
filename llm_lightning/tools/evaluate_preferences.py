"""``python evaluate.py ckpt_path=<a stage=dpo or stage=rm run>``: how well it ranks preference pairs.

- DPO: the implicit reward beta * (log pi(answer) - log ref(answer)); a pair is ranked right when
  the chosen answer's reward is above the rejected one's. The reference is the base with the
  adapter switched off, or the run's ``dpo.reference`` adapter.
- Reward model: its score of each answer, ranked the same way.

Accuracy counts a tie as half (``pairwise_accuracy``), so the untuned model (the policy equal to
its reference, or a reward head still at zero) is exactly 0.5 with margin 0: the ``base`` column.
Both columns also give ``likelihood_accuracy``: how often the language model itself (the base, and
for DPO the tuned policy) gives the chosen answer the higher mean log-probability per token, the
zero-shot ranking a reward has to beat. By default the pairs are the run's own held-out split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_lightning.adapter import MODULE_PREFIX, load_adapter, load_reward_model, read_training_checkpoint
from llm_lightning.data import PreferenceDataModule
from llm_lightning.dpo import pair_log_probs
from llm_lightning.errors import UserFacingError
from llm_lightning.loading import load_base_model
from llm_lightning.lora import lora_disabled, lora_state_dict, load_lora_state_dict
from llm_lightning.preference_loss import pairwise_accuracy
from llm_lightning.reward_model import score_sequences
from llm_lightning.settings import EvaluateSettings
from llm_lightning.tools.eval_report import Table, report


def ranking(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    chosen_t, rejected_t = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    return {"reward_accuracy": pairwise_accuracy(chosen_t, rejected_t).item(),
            "reward_margin": (chosen_t - rejected_t).mean().item()}


def likelihood_accuracy(scored: list[tuple[float, float, int, int]]) -> float:
    chosen = torch.tensor([c / max(nc, 1) for c, _, nc, _ in scored], dtype=torch.float64)
    rejected = torch.tensor([r / max(nr, 1) for _, r, _, nr in scored], dtype=torch.float64)
    return pairwise_accuracy(chosen, rejected).item()


def held_out_pairs(settings: EvaluateSettings, checkpoint: dict, tokenizer, path: Path):
    """The pairs to rank: the run's validation split (saved data settings, overridable), or every
    pair of ``data.path`` with ``split=all``."""
    saved = (checkpoint.get("PreferenceDataModule") or {}).get("settings", {})
    overrides = {k: v for k, v in vars(settings.data).items() if v is not None}
    if not saved and "path" not in overrides:
        raise UserFacingError(f"{path}: records no preference data; pass data.path=FILE of pairs")
    datamodule = PreferenceDataModule(tokenizer=tokenizer, **{**saved, **overrides})
    if settings.split.value == "val":
        datamodule.setup()
        pairs = datamodule.val_examples
    else:
        records, _ = datamodule.read()
        datamodule.choose_template([datamodule.as_conversation(r) for r in records])
        pairs, _, _ = datamodule.encode(records[: datamodule.limit or None])
    pairs = pairs[: settings.max_examples or None]
    if not pairs:
        raise UserFacingError(f"{datamodule.source}: no preference pairs to evaluate in split={settings.split.value}")
    return pairs, datamodule.source


def evaluate_preferences(settings: EvaluateSettings, path: Path, stage: str) -> dict:
    model, tokenizer = load_base_model(settings.model)
    if stage == "rm":
        head, checkpoint = load_reward_model(model, tokenizer, path, force=settings.force_adapter_load)
    else:
        checkpoint = load_adapter(model, tokenizer, path, force=settings.force_adapter_load)
    model.eval()
    pairs, source = held_out_pairs(settings, checkpoint, tokenizer, path)
    pad_id, batch_size = tokenizer.pad_id, settings.batch_size

    dpo = checkpoint.get("dpo") or {}
    if dpo.get("reference"):  # the untuned model is the run's reference adapter, not the bare base
        base = reference_adapter_log_probs(model, tokenizer, dpo["reference"], pairs, settings)
    else:
        with lora_disabled(model):
            base = pair_log_probs(model, pairs, pad_id, batch_size)
    untuned = {**ranking([0.0] * len(pairs), [0.0] * len(pairs)), "likelihood_accuracy": likelihood_accuracy(base)}
    if stage == "rm":
        scores = score_sequences(model, head, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id,
                                 batch_size)
        tuned = ranking(scores[:len(pairs)], scores[len(pairs):])
    else:
        reference = base
        policy = pair_log_probs(model, pairs, pad_id, batch_size)
        beta = dpo.get("beta", 0.1)
        tuned = ranking([beta * (p[0] - r[0]) for p, r in zip(policy, reference)],
                        [beta * (p[1] - r[1]) for p, r in zip(policy, reference)])
        tuned["likelihood_accuracy"] = likelihood_accuracy(policy)

    results = {**tuned, "pairs": len(pairs), "stage": stage, "checkpoint": str(path), "data": source,
               "split": settings.split.value, "base": untuned, "tuned": tuned}
    table = Table(f"{len(pairs)} preference pairs from {source} ({settings.split.value}), stage={stage}",
                  ["model", "reward accuracy", "reward margin", "likelihood accuracy"],
                  [[name, row["reward_accuracy"], row["reward_margin"], row.get("likelihood_accuracy")]
                   for name, row in (("base", untuned), ("tuned", tuned))])
    return report(results, table, settings.output, settings.logger)


def reference_adapter_log_probs(model, tokenizer, reference: str, pairs, settings: EvaluateSettings):
    """Log-probabilities under the run's ``dpo.reference`` adapter (the policy's LoRA layout, since
    the policy started from it), swapped in for the pass."""
    if not Path(reference).is_file():
        raise UserFacingError(f"dpo.reference={reference}: the run's reference adapter is gone; "
                              "evaluation needs it to compute the implicit reward")
    adapter = {k.removeprefix(MODULE_PREFIX): v for k, v in read_training_checkpoint(reference)["state_dict"].items()}
    policy = {k: v.clone() for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, adapter)
    try:
        return pair_log_probs(model, pairs, tokenizer.pad_id, settings.batch_size)
    finally:
        load_lora_state_dict(model, policy)

