"""Callbacks Lightning does not ship: memory and token accounting, and the run summary."""

from llm_lightning.callbacks.resources import ResourceMonitor, token_throughput_monitor

__all__ = ["ResourceMonitor", "token_throughput_monitor"]
