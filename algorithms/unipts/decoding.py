"""Reduce-regrow decoding: a genome (one real per prunable layer) -> per-layer sparsities.

Every layer is first reduced to P + delta; a regrow budget of delta * N weights is then handed back in
proportion to softmax(genome). The search (`search.py`) only ever sees genomes; this is the one place
they become allocations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ptsbench.toolkit.sparsity import PrunableLayer, counts_from_rates


def regrow_rates(genome: torch.Tensor, numels: Sequence[int], target: float, delta: float) -> torch.Tensor:
    """Per-layer sparsities decoded from a genome: reduce every layer to P + delta, regrow delta * N.

    The regrow budget is split in proportion to softmax(genome). A layer cannot regrow more than it lost
    in the reduce step; the reference clips such layers at sparsity 0 and lets the global sparsity drift
    above P. Here the clipped excess is water-filled over the unclipped layers (in proportion to their
    softmax shares, repeated until nothing more clips), so the decoded distribution averages to exactly P.
    """
    n = torch.tensor([float(v) for v in numels], dtype=torch.float64)
    genes = genome.detach().to(torch.float64).cpu()
    reduced = target + delta
    capacity = reduced * n  # everything a layer lost in the reduce step
    regrow = torch.zeros_like(n)
    free = torch.ones_like(n, dtype=torch.bool)
    remaining = delta * float(n.sum())
    while bool(free.any()):
        share = torch.softmax(genes.masked_fill(~free, -math.inf), dim=0)  # softmax over the free layers only
        proposal = remaining * share
        full = free & (proposal > capacity)
        if not bool(full.any()):
            regrow = torch.where(free, proposal, regrow)
            break
        regrow = torch.where(full, capacity, regrow)
        remaining -= float(capacity[full].sum())
        free &= ~full
    return (reduced - regrow / n).clamp(0.0, 1.0)


def decode_genome(genome: torch.Tensor, layers: list[PrunableLayer], target: float,
                  delta: float) -> dict[str, int]:
    """Exact per-layer counts of removed weights for a genome; they sum to round(P * N)."""
    layer_rates = regrow_rates(genome, [ly.numel for ly in layers], target, delta).tolist()
    return counts_from_rates(layers, {ly.name: r for ly, r in zip(layers, layer_rates, strict=True)}, target)
