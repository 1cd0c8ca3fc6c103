"""Wanda's score (Sun et al., ICLR 2024): |W_oj| * ||X_j||_2, the weight times the norm of the input
feature it reads over every calibration position (for a conv, the unfolded patch entry of its group)."""

from __future__ import annotations

import torch

from ptsbench.toolkit.scores import ScoreInputs, register_score
from ptsbench.toolkit.sparsity import PrunableLayer


def wanda_scores(weight: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| with the weight's shape; row o reads the norms of its own group."""
    rows = weight.shape[0]
    norms = squares.sqrt().repeat_interleave(rows // squares.shape[0], dim=0)
    return (weight.detach().float().reshape(rows, -1).abs() * norms).view(weight.shape)


@register_score("wanda", needs_calibration=True)
def wanda(layer: PrunableLayer, inputs: ScoreInputs) -> torch.Tensor:
    return wanda_scores(layer.weight, inputs.squares)
