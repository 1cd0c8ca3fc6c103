"""POT's allocation: |w| / ||W_l||_2 per layer, then one global threshold."""

from __future__ import annotations

from ptsbench.toolkit.allocations import AllocationInputs, register_allocation
from ptsbench.toolkit.sparsity import PrunableLayer, global_counts


@register_allocation("global_l2norm")
def global_l2norm(layers: list[PrunableLayer], target: float, inputs: AllocationInputs) -> dict[str, int]:
    scores = [ly.weight.abs() / ly.weight.norm().clamp_min(1e-12) for ly in layers]
    counts = global_counts(scores, target)
    return {ly.name: c for ly, c in zip(layers, counts, strict=True)}
