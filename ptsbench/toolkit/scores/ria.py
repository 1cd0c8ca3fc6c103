"""RIA's score (Zhang et al., "Plug-and-Play", ICLR 2024): relative importance times activations.

RI_ij = |W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|, the weight's share of its input channel j and of
its output row i, so a weight large for either channel survives; the score is RI_ij * ||X_j||^a
(a = `activation_exponent`, 0.5 in the paper). For a conv, W is (out, in/groups x kh x kw) over the
unfolded input and a column's sum runs over the rows of its group. An all-zero row or column gives its
term 0, not the reference's 0/0.
"""

from __future__ import annotations

import torch

from ptsbench.toolkit.scores import ScoreInputs, register_score
from ptsbench.toolkit.sparsity import PrunableLayer

ACTIVATION_EXPONENT = 0.5


def ria_scores(weight: torch.Tensor, squares: torch.Tensor, a: float = ACTIVATION_EXPONENT) -> torch.Tensor:
    """(|W_ij| / column sum + |W_ij| / row sum) * ||X_j||^a in the weight's shape; sums within each group."""
    groups = squares.shape[0]
    w = weight.detach().float().reshape(groups, weight.shape[0] // groups, -1).abs()
    tiny = torch.finfo(w.dtype).tiny  # an all-zero row or column: 0 / tiny = 0
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(tiny) + w / w.sum(dim=2, keepdim=True).clamp_min(tiny)
    return (relative * squares.sqrt().pow(a)[:, None, :]).view(weight.shape)


@register_score("ria", needs_calibration=True, options={"activation_exponent": ACTIVATION_EXPONENT})
def ria(layer: PrunableLayer, inputs: ScoreInputs) -> torch.Tensor:
    return ria_scores(layer.weight, inputs.squares, float(inputs.options["activation_exponent"]))
