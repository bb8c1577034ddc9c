"""Memory and token accounting during training.

Lightning's ``ThroughputMonitor`` logs tokens/s (``token_throughput_monitor`` wires it to our
batches); ``ResourceMonitor`` logs peak GPU memory allocated and reserved, or the process's peak
RSS on CPU, and keeps the totals that go into ``summary.json``.
"""

from __future__ import annotations

import resource
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from llm_lightning.data.encoding import IGNORE_INDEX

GIB = 2**30


def token_throughput_monitor(window_size: int = 5) -> ThroughputMonitor:
    """Lightning's monitor, counting padded tokens as items (samples are examples)."""
    return ThroughputMonitor(
        batch_size_fn=lambda batch: batch["input_ids"].shape[0],
        length_fn=lambda batch: batch["input_ids"].numel(),
        window_size=window_size,
    )


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


class ResourceMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.tokens = 0
        self.supervised_tokens = 0
        self.train_seconds = 0.0
        self._batch_start = 0.0
        self.peak: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.train_seconds += time.perf_counter() - self._batch_start
        self.tokens += batch["input_ids"].numel()
        self.supervised_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.peak = peak_memory_gib(pl_module.device)
        if trainer.global_step % self.log_every_n_steps == 0 and trainer.logger is not None:
            metrics = {**self.peak, "train/tokens_per_sec": self.tokens / max(self.train_seconds, 1e-9),
                       "train/supervised_tokens_per_sec": self.supervised_tokens / max(self.train_seconds, 1e-9)}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def summary(self) -> dict[str, float]:
        seconds = max(self.train_seconds, 1e-9)
        return {
            "train_tokens": self.tokens,
            "train_supervised_tokens": self.supervised_tokens,
            "train_seconds": round(self.train_seconds, 3),
            "train_tokens_per_sec": round(self.tokens / seconds, 2),
            "train_supervised_tokens_per_sec": round(self.supervised_tokens / seconds, 2),
            **{k.split("/", 1)[1]: round(v, 4) for k, v in self.peak.items()},
        }
