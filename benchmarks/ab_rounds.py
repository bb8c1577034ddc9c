"""How every side-by-side benchmark times and reports, so that its figures can be reproduced.

Timings on a shared 2-core machine drift by 10-20% over a minute, so two sides are never timed in
separate blocks: they alternate, one call each per round, and the ratio is taken within each
round. The report gives the median of those per-round ratios with their min and max, and the
machine they were measured on: CPU model, ISA flags, torch threads and which fast kernel paths
``cpu_kernels`` chose (its one log line is printed first).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from llm_lightning import cpu_kernels

MIN_ROUNDS = 5


def machine(device: str) -> dict[str, object]:
    """The machine's description for the JSON, with the GPU's name where one is used."""
    print(cpu_kernels.describe())
    report = cpu_kernels.report()
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    return report


def shapes_decided() -> dict[str, object]:
    """The weight shapes whose one-row products ``cpu_kernels`` decided while a benchmark ran."""
    return {"fp32_vector_shapes": cpu_kernels.report()["fp32_vector_shapes"]}


def alternate(sides: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Call each side once per round, in turn (``side(round_index)`` returns a time in seconds)."""
    if rounds < MIN_ROUNDS:
        raise SystemExit(f"error: {rounds} rounds; a ratio needs at least {MIN_ROUNDS}")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for index in range(rounds):
        for name, side in sides.items():
            times[name].append(side(index))
    return times


def speed_ratio(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Per-round speed ratios (their time / our time): median, min and max."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def format_ratio(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.2f}x (min {ratio['min']:.2f}x, max {ratio['max']:.2f}x over {ratio['rounds']} rounds)"
