"""RIA: relative importance and activations (Zhang et al., "Plug-and-Play", ICLR 2024), one shot, no
weight update.

Specification (paper, and biomedical-cybernetics/Relative-importance-and-activation-pruning `lib/prune.py`
`prune_ria`):
* Relative importance of weight (i, j): |W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|, its share of the
  total of its input channel j and of its output row i. A weight large for either of its channels
  survives, so no channel is pruned away entirely ("channel corruption").
* Score: RI_ij * (||X_j||_2)^a, the input norm over all calibration tokens, a = 0.5 (`--a`)
  (`ptsbench.toolkit.scores.ria`, shared with the score axis of magnitude pruning).
* Comparison group: the whole layer, the code's default; `--per_outneuron` would compare within rows as
  Wanda does. Under N:M every group of M consecutive inputs of a row keeps its N highest scores.
* No weight update. The code's optional extras are left out: the channel permutation for N:M
  (`--reallocation`, heuristic channel reallocation, and `--lsa`, linear sum assignment), off by default,
  and the SparseGPT-style update of the kept weights (`--reconstruction`).
* Calibration: the code prunes block by block on the already pruned prefix (`calib_protocol=sequential`;
  `sequential+bn` with BatchNorm re-estimation on vision models, as for SparseGPT).

Vision adaptation (our choices):
* Conv2d: W is (out, in/groups x kh x kw) over the unfolded input, as for Wanda here. Input channel j is a
  patch entry (c, ky, kx), and its sum runs over the rows that read it: those of its group. A depthwise
  conv's column has one row, so its first term is 1 for every nonzero weight and the score ranks by input
  norm first.
* An all-zero row or column gives its term 0, not the reference's 0/0.
* Counts: exactly the allocation's count, the lowest scores of the layer, ties by position. The reference
  prunes every score <= the one at index int(n p), one weight over p.
* The per-layer rate comes from the allocation axis (uniform in the paper), N:M from the `pattern` key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.oneshot import LayerwiseOneShot, OneShotSettings
from ptsbench.settings import NON_NEGATIVE, option
from ptsbench.toolkit.allocation import pattern_masks
from ptsbench.toolkit.layerwise import InputNorms
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.scores import get_score
from ptsbench.toolkit.scores.ria import ACTIVATION_EXPONENT
from ptsbench.toolkit.sparsity import PrunableLayer, magnitude_mask


def ria_mask(layer: PrunableLayer, squares: torch.Tensor, n_zero: int, pattern: Pattern,
             a: float = ACTIVATION_EXPONENT) -> torch.Tensor:
    scores = get_score("ria")(layer, squares, options={"activation_exponent": a})
    if pattern.is_nm:
        return pattern_masks([layer], {layer.name: n_zero}, pattern, {layer.name: scores})[layer.name]
    return magnitude_mask(layer.module.weight, n_zero, scores)


@dataclass(frozen=True)
class RIASettings(OneShotSettings):
    # a in ||x_j||^a (the reference's --a)
    activation_exponent: float = option(ACTIVATION_EXPONENT, NON_NEGATIVE)


class RIA(LayerwiseOneShot):
    name = "ria"
    statistic = InputNorms
    settings = RIASettings  # the reference's protocol, the base's default: block by block, pruned prefix

    def prune_layer(self, layer: PrunableLayer, stat: InputNorms, n_zero: int) -> torch.Tensor:
        mask = ria_mask(layer, stat.squares, n_zero, self.pattern, self.config.activation_exponent)
        mask = mask.to(layer.module.weight.dtype)
        layer.module.weight.data.mul_(mask)  # no weight update: the mask is the method
        return mask
