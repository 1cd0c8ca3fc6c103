"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, ICLR 2024), one shot, no weight update.

Specification (paper, and locuslab/wanda `lib/prune.py`, `image_classifiers/prune_utils.py`):
* Score of weight (o, j): S_oj = |W_oj| * ||X_j||_2, the norm of input feature j over every calibration
  token or position (`ptsbench.toolkit.scores.wanda`, shared with OWL and the score axis of magnitude
  pruning).
* Comparison group: each output row separately; a row loses its lowest-scoring weights. Under N:M each
  group of M consecutive inputs of a row keeps its N highest scores.
* No weight update. Input statistics from the dense network by default (`calib_protocol=dense`, one pass
  for all layers), as the reference's image-classifier code; its language-model code calibrates each block
  on the already pruned prefix (`calib_protocol=sequential`, `sequential+bn` on BN networks).

Vision adaptation (our choices; the reference prunes only the Linear layers of ViT/DeiT/ConvNeXt blocks):
* Conv2d, grouped and depthwise included: feature j of weight (o, c, ky, kx) is the unfolded patch entry
  (c, ky, kx) of o's group, over all output positions and images; padding zeros count as zeros. Pruning
  convolutions this way is our extension: tables should say so.
* Counts: a layer loses exactly its allocation's count (the audit demands round(p * n)). Every row loses
  floor(count / rows); the remainder goes to the rows whose next weight has the lowest score. The
  reference drops int(cols * p) per row, so its layers land a little under p; masks agree otherwise.
* The per-layer rate comes from the allocation axis (uniform in the paper; ERK, global, global-L2 or
  another job's allocation here), and N:M from the top-level `pattern` key.
"""

from __future__ import annotations

import torch

from algorithms.oneshot import LayerwiseOneShot
from ptsbench.toolkit.allocation import pattern_masks
from ptsbench.toolkit.layerwise import InputNorms
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.scores import get_score
from ptsbench.toolkit.sparsity import PrunableLayer


def row_mask(scores: torch.Tensor, n_zero: int) -> torch.Tensor:
    """{0,1} mask removing exactly `n_zero` entries, the lowest scores of each row (rows = dim 0).

    Each row loses floor(n_zero / rows); the remaining ones go to the rows whose next-lowest score is the
    smallest, ties broken by row index, so the count is exact and the comparison stays within rows.
    """
    flat = scores.reshape(scores.shape[0], -1)
    rows, cols = flat.shape
    base, extra = divmod(int(n_zero), rows)
    order = torch.sort(flat, dim=1, stable=True)
    drop = torch.zeros_like(flat, dtype=torch.bool)
    drop.scatter_(1, order.indices[:, :base], True)
    if extra:
        next_rows = torch.sort(order.values[:, base], stable=True).indices[:extra]
        drop[next_rows, order.indices[next_rows, base]] = True
    return (~drop).to(scores.dtype).view_as(scores)


def wanda_mask(layer: PrunableLayer, squares: torch.Tensor, n_zero: int, pattern: Pattern) -> torch.Tensor:
    scores = get_score("wanda")(layer, squares)
    if pattern.is_nm:
        return pattern_masks([layer], {layer.name: n_zero}, pattern, {layer.name: scores})[layer.name]
    return row_mask(scores, n_zero)


class Wanda(LayerwiseOneShot):
    name = "wanda"
    statistic = InputNorms

    def default_protocol(self) -> str:
        # locuslab/wanda's image-classifier code takes every layer's norms from the dense model
        return "dense"

    def prune_layer(self, layer: PrunableLayer, stat: InputNorms, n_zero: int) -> torch.Tensor:
        mask = wanda_mask(layer, stat.squares, n_zero, self.pattern).to(layer.module.weight.dtype)
        layer.module.weight.data.mul_(mask)  # no weight update: the mask is the method
        return mask
