"""Uniform: every layer at the target sparsity (the papers' default for Wanda, SparseGPT and RIA)."""

from __future__ import annotations

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.sparsity import PrunableLayer, counts_from_rates


@register_allocation("uniform")
def uniform(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    return counts_from_rates(layers, {ly.name: target for ly in layers}, target)
