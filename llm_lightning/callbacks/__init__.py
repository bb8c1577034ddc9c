"""Callbacks Lightning does not ship: memory and token accounting, and sample generations."""

from llm_lightning.callbacks.resources import ResourceMonitor, token_throughput_monitor
from llm_lightning.callbacks.samples import SampleGenerations

__all__ = ["ResourceMonitor", "SampleGenerations", "token_throughput_monitor"]
