"""Per-layer learnable thresholds, the controllable sparsity objective, and the exact final correction.

Layer l keeps the weights with |w| > t_l, t_l = sigmoid(s_l) in absolute-weight units (the released
code's `v1` mode); the score s_l is what the optimiser moves. The soft objective holds the global
sparsity near the target but not on it, so the method ends with one shared logit shift that lands the
count exactly on round(P * N).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from algorithms.fcpts.bridge import bridge_sparsity
from ptsbench.toolkit.compiled import maybe_compiled
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    counts_at_thresholds,
    masks_from_counts,
    sorted_magnitudes,
)

log = logging.getLogger(__name__)

THRESHOLD_GRADS = ("ste", "sparsity_only")
SPARSITY_LOSSES = ("abs", "pow2")
MIN_SCORE = -30.0  # the reference clamps initial scores here: sigmoid(-30) ~ 1e-13


# ------------------------------------------------------------------------------- the threshold mask


class MaskSTE(torch.autograd.Function):
    """M = 1[x > 0] for x = |w| - t, i.e. 0.5 * sign(x) + 0.5, with the clipped-identity straight-through
    gradient of sign: dM/dx = 0.5 where |x| < 1. Since |w| and t are both below one in practice, this
    gives dL/dt = -0.5 * sum_i w_i * dL/dW_eff_i: the threshold rises when shrinking the layer helps."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 0.5 * (x.abs() < 1).to(grad.dtype)


def ste_masked(weight: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """W * 1[|W| > sigmoid(s)], the gradient reaching s and |W| through the straight-through mask."""
    return weight * MaskSTE.apply(weight.abs() - torch.sigmoid(score))


def detached_masked(weight: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """W * 1[|W| > sigmoid(s)] with the mask built under no_grad: s gets no gradient from this path."""
    with torch.no_grad():  # the comparison in place on |W|: a 0/1 mask in W's dtype without a boolean copy
        mask = weight.abs().gt_(torch.sigmoid(score))
    return weight * mask


class HardMask(torch.autograd.Function):
    """W * 1[|W| > t], the gradient reaching W through the kept weights only and never t: the same values
    and gradients as `detached_masked`, but the mask is recomputed in the backward pass instead of saved."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, threshold)
        return weight * (weight.abs() > threshold).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, threshold = ctx.saved_tensors
        return grad * (weight.abs() > threshold).to(grad.dtype), None


def hard_masked(weight: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """`detached_masked` for torch.compile: a no_grad block inside a compiled function runs several times
    slower than eager, while this one fuses into a single loop each way."""
    return HardMask.apply(weight, torch.sigmoid(score).detach())


class ThresholdMask(nn.Module):
    """Parametrization W -> W * 1[|W| > sigmoid(s)] with the learnable score s of one layer.

    `threshold_grad="ste"` lets the reconstruction loss reach s (and |W|) through the mask (the paper's
    joint optimisation); `"sparsity_only"` builds the mask without gradient, as the released code does,
    so s moves only through the sparsity loss and the bridge. `compiled` fuses the chain (the job's
    `compile` key, ptsbench.toolkit.compiled).
    """

    def __init__(self, score: float, threshold_grad: str, device: torch.device, dtype: torch.dtype,
                 compiled: bool = False):
        super().__init__()
        self.score = nn.Parameter(torch.tensor(score, device=device, dtype=dtype))
        self.threshold_grad = threshold_grad
        masked = ste_masked if threshold_grad == "ste" else hard_masked if compiled else detached_masked
        self.masked = maybe_compiled(masked, compiled)

    def threshold(self) -> torch.Tensor:
        return torch.sigmoid(self.score)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.masked(weight, self.score)


def original_weight(layer: PrunableLayer) -> torch.Tensor:
    """The trained dense weight under a layer's parametrization (the mask is not applied)."""
    if parametrize.is_parametrized(layer.module, "weight"):
        return layer.module.parametrizations.weight.original
    return layer.module.weight


def layer_size(layer: PrunableLayer) -> int:
    """The layer's weight count, read without running its parametrization (`layer.numel` would)."""
    return original_weight(layer).numel()


def score_for_count(weight: torch.Tensor, k: int) -> float:
    """s = logit(t) with t between the k-th and (k+1)-th smallest |w|, so exactly k weights fall at or
    below it; t is half the smallest |w| for k = 0 (dense, yet the score can still move). Clamped at -30."""
    a = weight.detach().abs().reshape(-1)
    k = min(max(int(k), 0), a.numel() - 1)
    if k == 0:
        t = float(a.min()) / 2
    else:
        t = (float(torch.kthvalue(a, k).values) + float(torch.kthvalue(a, k + 1).values)) / 2
    t = min(max(t, 1e-300), 1.0 - 1e-7)
    return max(math.log(t) - math.log1p(-t), MIN_SCORE)


def attach_thresholds(layers: list[PrunableLayer], counts: dict[str, int], threshold_grad: str,
                      compiled: bool = False) -> list[ThresholdMask]:
    """Register one ThresholdMask per layer, initialised to prune `counts[name]` weights (ERK in prune)."""
    gates = []
    for ly in layers:
        w = original_weight(ly)
        gate = ThresholdMask(score_for_count(w, counts[ly.name]), threshold_grad, w.device, w.dtype, compiled)
        parametrize.register_parametrization(ly.module, "weight", gate)
        gates.append(gate)
    return gates


def zeros_at_thresholds(layers: list[PrunableLayer], gates: list[ThresholdMask]) -> int:
    """How many weights the current thresholds remove, over all layers."""
    return sum(int((original_weight(ly).abs() <= g.threshold()).sum())
               for ly, g in zip(layers, gates, strict=True))


# --------------------------------------------------------------------------- the controllable loss


def layer_sparsities(layers: list[PrunableLayer], gates: list[ThresholdMask], bridge: str,
                     bandwidth: str, compiled: bool = False) -> list[torch.Tensor]:
    """The bridged sparsity of every layer (exact counts forward, densities backward)."""
    return [bridge_sparsity(g.threshold(), original_weight(ly), bridge, bandwidth, compiled)
            for ly, g in zip(layers, gates, strict=True)]


def global_sparsity(layers: list[PrunableLayer], per_layer: list[torch.Tensor]) -> torch.Tensor:
    """S = sum_l n_l S_l / sum_l n_l: prunable weights only, biases excluded, as in the reference."""
    sizes = [layer_size(ly) for ly in layers]
    total = sum(sizes)
    return sum(s * (n / total) for n, s in zip(sizes, per_layer, strict=True))


def sparsity_loss(s: torch.Tensor, target: float, kind: str) -> torch.Tensor:
    """L_c: |S - P| (the reference run's choice) or (S - P)^2."""
    return (s - target).abs() if kind == "abs" else (s - target) ** 2


# ------------------------------------------------------------------------------- exact correction


@dataclass
class Correction:
    counts: dict[str, int]  # zeros per layer after the correction
    learned_counts: dict[str, int]  # zeros per layer at the learned thresholds
    logit_shift: float  # the shared shift added to every score

    @property
    def weights_moved(self) -> int:
        """Weights whose mask the correction flipped: both masks prune a prefix of the same sorted |w|."""
        return sum(abs(self.counts[n] - self.learned_counts[n]) for n in self.counts)


def layer_magnitudes(layers: list[PrunableLayer]) -> list[torch.Tensor]:
    """Each layer's trained |w| in ascending order (see `sorted_magnitudes`)."""
    return sorted_magnitudes([original_weight(ly) for ly in layers])


def exact_counts(layers: list[PrunableLayer], gates: list[ThresholdMask], sorted_abs: list[torch.Tensor],
                 target: float, max_steps: int = 200) -> Correction:
    """Per-layer zero counts summing exactly to round(target * N), by one shared logit shift.

    Adding the same delta to every score moves each threshold in proportion to sigma'(s_l), as the
    sparsity loss would, so the learned allocation keeps its shape; delta = 0 when the soft objective
    already hit the target. The count is a step function of delta: bisection brackets the target, and a
    remainder left by tied magnitudes is split in layer order (the masks resolve ties by position).
    """
    scores = torch.tensor([g.score.item() for g in gates], dtype=torch.float64)
    sizes = [a.numel() for a in sorted_abs]
    want = round(target * sum(sizes))

    def counts_at(delta: float) -> list[int]:
        return counts_at_thresholds(sorted_abs, torch.sigmoid(scores + delta).tolist())

    learned = counts_at(0.0)
    lo, hi = -60.0, 60.0
    c_lo, c_hi = counts_at(lo), counts_at(hi)
    if sum(learned) == want:
        lo, c_lo, c_hi = 0.0, learned, learned
    elif sum(c_lo) > want or sum(c_hi) < want:
        log.warning("FCPTS: thresholds cannot reach %d zeros (exact zeros or |w| >= 1); "
                    "distributing the rest.", want)
        lo = hi if sum(c_hi) < want else lo
        c_lo = c_lo if sum(c_lo) <= want else [0] * len(sizes)
        c_hi = c_hi if sum(c_hi) >= want else sizes
    else:
        for _ in range(max_steps):
            mid = 0.5 * (lo + hi)
            c_mid = counts_at(mid)
            if sum(c_mid) <= want:
                lo, c_lo = mid, c_mid
            else:
                hi, c_hi = mid, c_mid
            if sum(c_lo) == want or hi - lo < 1e-12:
                break
    counts = list(c_lo)
    short = want - sum(counts)
    for i in range(len(counts)):
        add = min(short, c_hi[i] - counts[i])
        counts[i] += add
        short -= add
    names = [ly.name for ly in layers]
    return Correction(dict(zip(names, counts, strict=True)), dict(zip(names, learned, strict=True)), lo)


def count_masks(layers: list[PrunableLayer], sorted_abs: list[torch.Tensor], counts: dict[str, int]
                ) -> dict[str, torch.Tensor]:
    """{0,1} masks removing exactly counts[name] smallest trained |w| per layer."""
    masks = masks_from_counts([original_weight(ly) for ly in layers], sorted_abs,
                              [counts[ly.name] for ly in layers])
    return {ly.name: m for ly, m in zip(layers, masks, strict=True)}
