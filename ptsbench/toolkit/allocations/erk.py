"""Erdos-Renyi-Kernel (RigL): keep-density proportional to (sum of dims / product of dims) ** power_scale,
layers that would be over-dense made dense (`ptsbench.toolkit.sparsity.erk_allocation`, which FCPTS also
starts from)."""

from __future__ import annotations

from collections.abc import Mapping

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.sparsity import PrunableLayer, counts_from_rates, erk_allocation


def erk_label(options: Mapping[str, float]) -> str:
    power = options["erk_power_scale"]
    return "erk" if power == 1.0 else f"erk{power:g}"


@register_allocation("erk", options={"erk_power_scale": 1.0}, label=erk_label)
def erk(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    rates = erk_allocation(layers, target, inputs.options["erk_power_scale"])
    return counts_from_rates(layers, rates, target)
