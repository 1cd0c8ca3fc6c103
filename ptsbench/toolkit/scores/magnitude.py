"""|w|: the weight's own size, the score every pruning paper starts from."""

from __future__ import annotations

import torch

from ptsbench.toolkit.scores import ScoreInputs, register_score
from ptsbench.toolkit.sparsity import PrunableLayer


@register_score("magnitude")
def magnitude(layer: PrunableLayer, inputs: ScoreInputs) -> torch.Tensor:
    return layer.weight.detach().abs()
