"""Uniform random scores: the control every criterion must beat (ShrinkBench's `RandomPruning`).

Drawn on the CPU from the job's seeded stream, layer after layer, so the same seed gives the same masks on
any device.
"""

from __future__ import annotations

import torch

from ptsbench.toolkit.scores import ScoreInputs, register_score
from ptsbench.toolkit.sparsity import PrunableLayer


@register_score("random")
def random(layer: PrunableLayer, inputs: ScoreInputs) -> torch.Tensor:
    return torch.rand(layer.weight.shape, generator=inputs.generator).to(layer.weight.device)
