"""OWL, outlier weighed layerwise sparsity (Yin et al., ICML 2024): per-layer rates from the share of outliers
among each layer's Wanda scores. An allocation (`algorithm.allocation=owl`) that reads calibration statistics,
so any method that prunes each layer at a given rate takes it (magnitude, Wanda, SparseGPT, RIA).

Specification (paper, and luuyin/OWL `lib/prune_all.py`: `prune_wanda_outlier`, `prune_sparsegpt_outlier`,
`prune_mag_outlier`, `check_outlier_mean`):
* Score of weight (i, j): Wanda's |W_ij| * ||X_j||_2, with the input norms of the dense network (the
  reference runs the calibration set through the unpruned blocks before pruning anything).
* Outlier ratio of a layer (its LOD): the share of its scores above M times their mean. M = 5 in the paper
  and in the README's scripts (`--Hyper_m 5`; the argparse default is 3).
* The ratios are min-max normalised to D_l in [0, 2 lambda] (lambda = `--Lamda`, 0.08) and a layer keeps the
  density D_l - mean(D) + (1 - target): its sparsity is target + mean(D) - D_l. Layers with more outliers
  are pruned less, the rates lie within lambda of the target on either side of the mean, and they average
  to the target.
* The per-layer method is unchanged; the magnitude and SparseGPT variants take the same Wanda-based ratios.

Vision adaptation (our choices):
* The unit is each prunable Conv2d or Linear. The reference's "layer" is a transformer block: it pools the
  scores of the block's Linear layers and gives them one rate. A CNN block mixes layers of different roles
  and sizes (a depthwise 3x3 beside two 1x1 convs), and stems and classifiers stand alone. Convolutions
  are scored through their unfolded inputs, as Wanda is here, with depthwise groups reading their own inputs.
* The mean is weighted by layer size: sparsity_l = target + c - D_l with c = sum_l n_l D_l / N, so the
  parameter-weighted global sparsity is the target exactly. The reference subtracts the plain mean over
  blocks, which hits the target only because an LLM's blocks have equal sizes; with equal sizes c is that
  mean and the rates are the reference's.
* Bounds: rates are clipped to [0, 1] and c is re-solved (bisection) so that the weighted mean stays the
  target. Rates lie within 2 lambda of the target, so this can only happen for targets within 2 lambda of
  0 or 1 (above 0.84 with the defaults). The reference sets a rate <= 0 to 0.01 and lets the mean drift.
* If every layer has the same ratio the reference divides by zero; the rates are then uniform.
* Counts: `counts_from_rates` with the target, so every layer is within one weight of rate * n and the
  total is exactly round(target * N), as the audit demands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ptsbench.settings import POSITIVE, Range, Settings, option
from ptsbench.toolkit.scores.wanda import wanda_scores
from ptsbench.toolkit.sparsity import PrunableLayer, check_sparsity, counts_from_rates

BISECTION_STEPS = 200  # halvings of c's bracket: far below float64 resolution


@dataclass(frozen=True)
class OWLSettings(Settings):
    """`algorithm.owl`: the paper's M and lambda."""

    m: float = option(5.0, POSITIVE)  # a score is an outlier above m times its layer's mean score
    lam: float = option(0.08, Range(0, 1))  # the rates spread within about +-lam around the target


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """The share of `scores` above m times their mean (the reference reports it in percent)."""
    flat = scores.detach().reshape(-1)
    return int((flat > flat.mean() * m).sum()) / flat.numel()


def owl_rates(sizes: Mapping[str, int], ratios: Mapping[str, float], target: float,
              lam: float) -> dict[str, float]:
    """Per-layer sparsities from outlier ratios: target + c - D_l, D the ratios scaled to [0, 2 lam], c such
    that the size-weighted mean of the rates, clipped to [0, 1], is the target."""
    names = list(ratios)
    r = torch.tensor([ratios[k] for k in names], dtype=torch.float64)
    n = torch.tensor([sizes[k] for k in names], dtype=torch.float64)
    spread = r.max() - r.min()
    if spread == 0:
        return {k: float(target) for k in names}
    d = (r - r.min()) / spread * (2.0 * lam)
    c = (n * d).sum() / n.sum()

    def clipped(shift: torch.Tensor) -> torch.Tensor:
        return (target + shift - d).clamp(0.0, 1.0)

    if bool(((target + c - d) < 0).any() or ((target + c - d) > 1).any()):
        low, high = d.min() - target, d.max() + 1.0 - target  # all rates 0 / all rates 1
        for _ in range(BISECTION_STEPS):
            c = (low + high) / 2
            if (n * clipped(c)).sum() / n.sum() < target:
                low = c
            else:
                high = c
    return {k: float(v) for k, v in zip(names, clipped(c), strict=True)}


def owl_ratios(layers: list[PrunableLayer], squares: Mapping[str, torch.Tensor],
               m: float) -> dict[str, float]:
    """Each layer's outlier ratio of Wanda scores; `squares` are its squared input norms (`InputNorms`)."""
    return {ly.name: outlier_ratio(wanda_scores(ly.weight, squares[ly.name]), m) for ly in layers}


def owl_counts(layers: list[PrunableLayer], target: float, squares: Mapping[str, torch.Tensor],
               settings: OWLSettings) -> dict[str, int]:
    """Zeros per layer under OWL: exact counts whose total is round(target * N)."""
    target = check_sparsity(target)
    ratios = owl_ratios(layers, squares, settings.m)
    layer_rates = owl_rates({ly.name: ly.numel for ly in layers}, ratios, target, settings.lam)
    return counts_from_rates(layers, layer_rates, target)
