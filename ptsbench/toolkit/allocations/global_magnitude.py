"""Global magnitude: the round(target * N) smallest |w| over all layers, one threshold for the network.
(Registered as `global`; the module cannot bear that name, a Python keyword.)"""

from __future__ import annotations

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.sparsity import PrunableLayer, global_counts


@register_allocation("global")
def global_magnitude(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    counts = global_counts([ly.weight.abs() for ly in layers], target)
    return {ly.name: c for ly, c in zip(layers, counts, strict=True)}
